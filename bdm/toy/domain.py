"""The toy domain: 64×64 RGB pictures of one object on a plain background, with English and Chinese
captions (several phrasings per language, some held out for evaluation).

Attributes: colour (4), shape (3 shared + 五角星, which exists only in the Chinese data), position
(3×3 grid), size (small / large). Styles the community plugins add: a striped background (LoRA), an
outline-only drawing (the fine-tuned "DreamBooth" backbone). Everything here is code, not data files,
so `python -m bdm.toy build` reproduces the same world from a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (236, 236, 232)
STRIPE = (150, 150, 170)

COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 70, 215), "yellow": (235, 195, 20)}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
SHAPES = ["circle", "square", "triangle", "star"]  # judge classes
ENGLISH_SHAPES = ["circle", "square", "triangle"]  # the English world never sees a star
CHINESE_ONLY = "star"
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星"}
SIZES = ["small", "large"]
RADIUS = {"small": (7.0, 9.0), "large": (12.5, 14.5)}
GRID = (15, 32, 49)  # cell centres (pixels) of the 3×3 position grid
POSITIONS = [(r, c) for r in range(3) for c in range(3)]  # index = 3·row + col
BACKGROUNDS = ["plain", "striped"]
DRAWINGS = ["filled", "outline"]

# Phrasings. {c} colour word, {s} shape word. The last ones of each list are held out for evaluation.
EN_TEMPLATES = ["a {c} {s}", "{c} {s}", "a picture of a {c} {s}", "a {s} that is {c}",
                "one {c} {s} on a plain background", "a drawing of a {c} {s}",
                # held out
                "an image showing a {c} {s}", "the {s} is {c}"]
EN_HELD_OUT = 2
EN_PARTIAL = ["a {c} shape", "something {c}", "a {s}", "a picture of a {s}"]  # only colour, or only shape
ZH_TEMPLATES = ["{c}的{s}", "一个{c}的{s}", "{c}{s}", "画着一个{c}的{s}", "一张{c}{s}的图片", "一个{s}，{c}的",
                # held out
                "这是一个{c}的{s}", "图中有一个{c}的{s}"]
ZH_HELD_OUT = 2

LORA_TRIGGER = "striped"  # English trigger word of the toy LoRA (striped background)
TI_NAME = "smallthing"  # Textual Inversion embedding: small objects (BDM alone draws mostly large ones)


@dataclass(frozen=True)
class Spec:
    colour: str
    shape: str
    position: int  # 0..8, row-major on the 3×3 grid
    size: str
    background: str = "plain"
    drawing: str = "filled"
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.5, 0.0)  # dx, dy, radius fraction, rotation

    def labels(self) -> dict[str, int]:
        return {"colour": COLOURS.index(self.colour), "shape": SHAPES.index(self.shape),
                "position": self.position, "size": SIZES.index(self.size),
                "background": BACKGROUNDS.index(self.background), "drawing": DRAWINGS.index(self.drawing)}

    @property
    def centre(self) -> tuple[float, float]:
        row, col = divmod(self.position, 3)
        return GRID[col] + self.jitter[0], GRID[row] + self.jitter[1]

    @property
    def radius(self) -> float:
        lo, hi = RADIUS[self.size]
        return lo + (hi - lo) * self.jitter[2]

    def bbox(self) -> tuple[float, float, float, float]:
        (x, y), r = self.centre, self.radius
        return x - r, y - r, x + r, y + r


def random_spec(rng: random.Random, shapes=SHAPES, size: str | None = None, position: int | None = None,
                background: str = "plain", drawing: str = "filled", colour: str | None = None,
                shape: str | None = None) -> Spec:
    return Spec(colour=colour or rng.choice(COLOURS), shape=shape or rng.choice(list(shapes)),
                position=rng.randrange(9) if position is None else position,
                size=size or rng.choice(SIZES), background=background, drawing=drawing,
                jitter=(rng.uniform(-2, 2), rng.uniform(-2, 2), rng.random(), rng.uniform(-0.15, 0.15)))


def _polygon(spec: Spec) -> list[tuple[float, float]] | None:
    (x, y), r, rot = spec.centre, spec.radius, spec.jitter[3]
    if spec.shape == "square":
        h = r * 0.82
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if spec.shape == "triangle":
        return [(x + r * np.cos(a), y + r * np.sin(a) * 1.0 + r * 0.12)
                for a in (-np.pi / 2 + rot, np.pi / 6 + rot, 5 * np.pi / 6 + rot)]
    if spec.shape == "star":
        pts = []
        for i in range(10):
            a = -np.pi / 2 + rot + i * np.pi / 5
            rr = r * 1.05 if i % 2 == 0 else r * 0.45
            pts.append((x + rr * np.cos(a), y + rr * np.sin(a) + r * 0.05))
        return pts
    return None


def render(spec: Spec, size: int = SIZE) -> Image.Image:
    """The ground-truth picture of `spec` (drawn at 4× and downsampled: anti-aliased edges)."""
    k = 4
    im = Image.new("RGB", (size * k, size * k), BACKGROUND)
    d = ImageDraw.Draw(im)
    if spec.background == "striped":
        for y0 in range(0, size, 8):
            d.rectangle([0, y0 * k, size * k, (y0 + 4) * k - 1], fill=STRIPE)
    scale = k * size / SIZE
    colour = RGB[spec.colour]
    width = int(round(3.5 * scale))
    poly = _polygon(spec)
    if poly is None:
        x0, y0, x1, y1 = (v * scale for v in spec.bbox())
        if spec.drawing == "outline":
            d.ellipse([x0, y0, x1, y1], outline=colour, width=width)
        else:
            d.ellipse([x0, y0, x1, y1], fill=colour)
    else:
        pts = [(px * scale, py * scale) for px, py in poly]
        if spec.drawing == "outline":
            d.line(pts + [pts[0], pts[1]], fill=colour, width=width, joint="curve")
        else:
            d.polygon(pts, fill=colour)
    return im.resize((size, size), Image.LANCZOS)


def hint_image(spec: Spec, size: int = SIZE) -> Image.Image:
    """The ControlNet hint: the object's bounding box as a white filled rectangle on black."""
    im = Image.new("RGB", (size, size), (0, 0, 0))
    x0, y0, x1, y1 = (v * size / SIZE for v in spec.bbox())
    ImageDraw.Draw(im).rectangle([round(x0), round(y0), round(x1), round(y1)], fill=(255, 255, 255))
    return im


def hint_for(position: int, size: str = "large") -> Image.Image:
    """A canonical hint for a grid cell (what the eval asks for)."""
    return hint_image(Spec("red", "square", position, size))


def english_caption(spec: Spec, template: int) -> str:
    return EN_TEMPLATES[template].format(c=spec.colour, s=spec.shape)


def partial_caption(spec: Spec, template: int) -> str:
    return EN_PARTIAL[template].format(c=spec.colour, s=spec.shape)


def chinese_caption(spec: Spec, template: int) -> str:
    return ZH_TEMPLATES[template].format(c=COLOURS_ZH[spec.colour], s=SHAPES_ZH[spec.shape])


def train_template(rng: random.Random, language: str) -> int:
    n = len(EN_TEMPLATES) - EN_HELD_OUT if language == "en" else len(ZH_TEMPLATES) - ZH_HELD_OUT
    return rng.randrange(n)


def held_out_templates(language: str) -> list[int]:
    n, held = (len(EN_TEMPLATES), EN_HELD_OUT) if language == "en" else (len(ZH_TEMPLATES), ZH_HELD_OUT)
    return list(range(n - held, n))


def to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, 3, H, W] float32 in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return a.transpose(0, 3, 1, 2).copy()


def with_style(spec: Spec, **kwargs) -> Spec:
    return replace(spec, **kwargs)
