// Progressive enhancement only: everything works without this file.
// Confirms a manual close so that a stray keypress does not close a referral's alert.
document.addEventListener("submit", function (ev) {
  var f = ev.target;
  var closing = (f.action && /\/close$/.test(f.action)) || f.querySelector("input[name=action][value=close]");
  if (closing && !window.confirm("Close this referral?")) { ev.preventDefault(); }
});
// The worklist's bulk form: a "select all on this page" box in the header cell.
(function () {
  var form = document.getElementById("bulk");
  var head = form && form.querySelector("thead th");
  if (!head) { return; }
  var all = document.createElement("input");
  all.type = "checkbox";
  all.setAttribute("aria-label", "Select all rows on this page");
  all.addEventListener("change", function () {
    form.querySelectorAll("tbody input[name=alert]").forEach(function (box) { box.checked = all.checked; });
  });
  head.appendChild(all);
})();
