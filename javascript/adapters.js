// Adapters panel: hover titles for the unit tool buttons (gradio 3.41 buttons take no tooltip).
(function () {
    const TITLES = {
        _preview_button: "Run the preprocessor on the unit's image and show the result",
        _refresh: "Rescan the model folders for adapter files",
    };

    function addTitles() {
        for (const [suffix, title] of Object.entries(TITLES)) {
            gradioApp().querySelectorAll(`[id*="_adapters_unit"][id$="${suffix}"]`).forEach((el) => {
                if (!el.title) el.title = title;
            });
        }
    }

    onUiLoaded(addTitles);
})();
