// Train Adapter tab: the Train/Resume buttons' submit function and hover titles.
// adapters_train_start runs in the browser before the handler, like the WebUI's own
// start_training_textual_inversion: it makes a "task(...)" id (the first input) that the job
// manager registers with modules.progress, and starts the WebUI's progress bar on it. Outside the
// WebUI (the tests' host page) randomId/requestProgress do not exist: it still makes an id.

function adapters_train_start() {
    var app = typeof gradioApp === "function" ? gradioApp() : document;
    var id = typeof randomId === "function" ? randomId()
        : "task(" + Math.random().toString(36).slice(2, 9) + Math.random().toString(36).slice(2, 9) + ")";
    var container = app.getElementById("adapters_train_progress");
    if (typeof requestProgress === "function" && container) {
        requestProgress(id, container, null, function() {});
    }
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

(function() {
    var TITLES = {
        adapters_train_refresh: "Show the current run (after a page reload)",
        adapters_train_interrupt: "Stop at the next step and save a checkpoint",
        adapters_train_resume: "Continue the interrupted run of this output name from its last checkpoint",
    };

    function addTitles() {
        var app = typeof gradioApp === "function" ? gradioApp() : document;
        Object.keys(TITLES).forEach(function(id) {
            var el = app.getElementById(id);
            if (el && !el.title) el.title = TITLES[id];
        });
    }

    // Show the log's newest line when new lines arrive (gradio 3.41 textboxes do not autoscroll).
    var lastLog = "";
    function scrollLog() {
        var app = typeof gradioApp === "function" ? gradioApp() : document;
        var box = app.querySelector("#adapters_train_log textarea");
        if (!box || box.value === lastLog) return;
        lastLog = box.value;
        box.scrollTop = box.scrollHeight;
    }

    if (typeof onUiLoaded === "function") onUiLoaded(addTitles);
    if (typeof onAfterUiUpdate === "function") onAfterUiUpdate(scrollLog);
})();
