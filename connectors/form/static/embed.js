/* ticketgate form embed: <script src="https://gateway.example/forms/INBOX/embed.js" async></script>
   renders the form in an iframe where the script tag stands. Optional attributes:
   data-lang="zh|en", data-height="720px", data-title="Contact form". */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.src) { return; }
  var url = script.src.replace(/\/embed\.js(?:[?#].*)?$/, "");
  var lang = script.getAttribute("data-lang");
  if (lang === "zh" || lang === "en") { url += "?lang=" + lang; }
  var frame = document.createElement("iframe");
  frame.src = url;
  frame.title = script.getAttribute("data-title") || "Contact form";
  frame.loading = "lazy";
  frame.style.width = "100%";
  frame.style.border = "0";
  frame.style.minHeight = script.getAttribute("data-height") || "720px";
  script.parentNode.insertBefore(frame, script);
})();
