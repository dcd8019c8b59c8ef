// BDM: put the Chinese prompt boxes directly under the WebUI's own prompt and negative prompt, and
// give them a token counter in 52-token chunks (50 tokens + [CLS]/[SEP]) like the main prompt's.
// Ctrl+Enter already generates from any box of the tab (the WebUI's global key handler in script.js).
(function() {
    const TABS = ["txt2img", "img2img"];
    const KINDS = [["prompt", "prompt_row"], ["neg_prompt", "neg_prompt_row"]];

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

    const timers = {};
    function setupCounter(tab, kind) {
        const app = gradioApp();
        const id = `bdm_${tab}_cn_${kind}`;
        const textarea = app.querySelector(`#${id} textarea`);
        const button = app.getElementById(`${id}_token_button`);
        const counter = app.getElementById(`${id}_token_counter`);
        if (!textarea || !button || !counter || textarea.dataset.bdmCounter) return;
        textarea.dataset.bdmCounter = "1";
        const box = app.getElementById(id);
        box.parentElement.insertBefore(counter, box);
        box.parentElement.style.position = "relative";
        const update = () => {
            clearTimeout(timers[id]);
            timers[id] = setTimeout(() => button.click(), 500);
        };
        textarea.addEventListener("input", update);
        // values set by "Send to txt2img" / paste arrive without input events
        new MutationObserver(update).observe(textarea, {attributes: true});
        textarea.addEventListener("change", update);
        update();
    }

    function setup() {
        placeBoxes();
        for (const tab of TABS) {
            for (const [kind] of KINDS) setupCounter(tab, kind);
        }
    }

    onUiLoaded(setup);
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(placeBoxes);
    } else if (typeof onUiUpdate === "function") {
        onUiUpdate(placeBoxes);
    }
})();
