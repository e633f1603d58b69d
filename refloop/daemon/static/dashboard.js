// Progressive enhancement only: everything works without this file.
// Confirms a manual close so that a stray keypress does not close a referral's alert.
document.addEventListener("submit", function (ev) {
  var f = ev.target;
  if (f.action && /\/close$/.test(f.action) && !window.confirm("Close this alert?")) { ev.preventDefault(); }
});
