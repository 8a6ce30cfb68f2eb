// Loaded before RequireJS and the Jupyter widgets HTML manager on pages that embed widgets (see
// nb_ipywidgets_js in _config.yml). It makes the copies the book serves work without a network.
(function () {
  "use strict";
  // 1. The widget manager loads its icon fonts from "@jupyter-widgets/html-manager/dist/", resolved by
  //    RequireJS against the page's folder. Point that module path at the copy in _static/vendor/.
  //    RequireJS reads a global `require` object defined before it loads as its configuration.
  var vendor = new URL("vendor/", document.currentScript.src).href;
  window.require = { paths: { "@jupyter-widgets/html-manager/dist": vendor + "html-manager" } };

  // 2. ipywidgets 8 typesets widget labels with MathJax 2's API, MathJax.Hub.Queue(["Typeset",
  //    MathJax.Hub, element]); the book serves MathJax 3, whose API is MathJax.typesetPromise().
  function typeset(element) {
    var mathjax = window.MathJax;
    if (!mathjax || !mathjax.startup || !mathjax.startup.promise) {
      return; // MathJax has not started: its first pass typesets everything already on the page
    }
    mathjax.startup.promise.then(function () {
      return mathjax.typesetPromise([element]);
    });
  }
  function queue() {
    for (var i = 0; i < arguments.length; i++) {
      var job = arguments[i];
      if (Array.isArray(job) && job[0] === "Typeset" && job[2]) {
        typeset(job[2]);
      }
    }
  }
  function installHub() {
    if (window.MathJax && !window.MathJax.Hub) {
      window.MathJax.Hub = { Queue: queue };
    }
  }
  // MathJax 3 is a deferred script, so it has replaced its configuration object by window.MathJax when
  // DOMContentLoaded fires; this listener runs before the widget manager's (registered after it).
  document.addEventListener("DOMContentLoaded", installHub);
})();
