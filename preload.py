"""Command-line flags of the BDM extension (read by the WebUI before it parses its arguments)."""


def preload(parser):
    parser.add_argument("--bdm-models-path", type=str, default=None,
                        help="BDM: an extra folder with BDM models (besides models/bdm)")
