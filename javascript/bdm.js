// BDM: put the Chinese prompt boxes (and, under the negative one, BDM's on/off, model and strength) directly
// under the WebUI's own prompt and negative prompt; give them a token counter in 52-token chunks (50 tokens
// + [CLS]/[SEP]) like the main prompt's. Typing into an empty Chinese box switches BDM on (as the ControlNet
// extension enables a unit when an image is given); a Chinese box whose text BDM will not use (BDM switched
// off by hand) says so. Warnings of BDM under the image stand out. Ctrl+Enter already generates from any
// box of the tab (the WebUI's global key handler in script.js).
(function() {
    const TABS = ["txt2img", "img2img"];
    const KINDS = [["prompt", "prompt_row"], ["neg_prompt", "neg_prompt_row"]];
    const OFF_NOTE = "BDM 未启用：这里的中文不会被使用 / BDM is off: this Chinese text is not used";

    function placeBoxes() {
        const app = gradioApp();
        for (const tab of TABS) {
            for (const [kind, row] of KINDS) {
                const box = app.getElementById(`bdm_${tab}_cn_${kind}_container`);
                const anchor = app.getElementById(`${tab}_${row}`);
                if (!box || !anchor || anchor.nextElementSibling === box) continue;
                anchor.parentElement.insertBefore(box, anchor.nextSibling);
                box.classList.add("bdm-placed");
            }
        }
    }

    function enabledBox(tab) {
        return gradioApp().querySelector(`#bdm_${tab}_enabled input[type=checkbox]`);
    }

    function chineseText(tab) {
        return KINDS.map(([kind]) => gradioApp().querySelector(`#bdm_${tab}_cn_${kind} textarea`))
            .filter(Boolean).map(t => t.value.trim()).join("");
    }

    // the note on the Chinese boxes when they hold text and BDM is off
    function markIgnored(tab) {
        const enabled = enabledBox(tab);
        if (!enabled) return;
        const ignored = !enabled.checked && chineseText(tab) !== "";
        for (const [kind] of KINDS) {
            const container = gradioApp().getElementById(`bdm_${tab}_cn_${kind}_container`);
            if (!container) continue;
            container.classList.toggle("bdm-ignored", ignored);
            let note = container.querySelector(".bdm-off-note");
            if (!note && kind === "prompt") {
                note = document.createElement("div");
                note.className = "bdm-off-note";
                note.textContent = OFF_NOTE;
                container.appendChild(note);
            }
        }
    }

    const timers = {};
    function setupBox(tab, kind) {
        const app = gradioApp();
        const id = `bdm_${tab}_cn_${kind}`;
        const textarea = app.querySelector(`#${id} textarea`);
        const button = app.getElementById(`${id}_token_button`);
        const counter = app.getElementById(`${id}_token_counter`);
        if (!textarea || !button || !counter || textarea.dataset.bdmSetUp) return;
        textarea.dataset.bdmSetUp = "1";
        const box = app.getElementById(id);
        box.parentElement.insertBefore(counter, box);
        box.parentElement.style.position = "relative";
        const count = () => {
            clearTimeout(timers[id]);
            timers[id] = setTimeout(() => button.click(), 500);
        };
        let before = textarea.value;
        textarea.addEventListener("input", () => {
            const enabled = enabledBox(tab);
            // typing into an empty Chinese box means "use BDM": switch it on (once; switching it off
            // again by hand is respected until the box is emptied)
            if (before.trim() === "" && textarea.value.trim() !== "" && enabled && !enabled.checked) {
                enabled.click();
            }
            before = textarea.value;
            count();
            markIgnored(tab);
        });
        // values set by "Send to txt2img" / paste arrive without input events
        new MutationObserver(count).observe(textarea, {attributes: true});
        textarea.addEventListener("change", () => {
            before = textarea.value;
            count();
            markIgnored(tab);
        });
        count();
    }

    function setupEnabled(tab) {
        const enabled = enabledBox(tab);
        if (!enabled || enabled.dataset.bdmSetUp) return;
        enabled.dataset.bdmSetUp = "1";
        enabled.addEventListener("change", () => markIgnored(tab));
    }

    // BDM's warnings under the image (the WebUI's comments, e.g. "BDM was not applied: …")
    function markWarnings() {
        for (const tab of TABS) {
            const comments = gradioApp().querySelector(`#html_log_${tab} .comments`);
            if (comments) comments.classList.toggle("bdm-warning", /\bBDM\b/.test(comments.textContent));
        }
    }

    function setup() {
        placeBoxes();
        for (const tab of TABS) {
            for (const [kind] of KINDS) setupBox(tab, kind);
            setupEnabled(tab);
            markIgnored(tab);
        }
    }

    function update() {
        placeBoxes();
        markWarnings();
        for (const tab of TABS) markIgnored(tab);
    }

    onUiLoaded(setup);
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(update);
    } else if (typeof onUiUpdate === "function") {
        onUiUpdate(update);
    }
})();
