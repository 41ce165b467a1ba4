// "Synchronize from a date" without leaving the page: count (dry run), then
// "Initialize N events", then a progress bar fed by the job's progress.
// Without JavaScript the same forms work through full page loads.
(function () {
  "use strict";
  var form = document.getElementById("resync-form");
  if (!form) { return; }
  var confirmBox = document.getElementById("resync-confirm");
  var startForm = document.getElementById("resync-start-form");
  var startButton = document.getElementById("resync-start");
  var jobBox = document.getElementById("resync-job");
  var bar = document.getElementById("resync-progress");
  var status = document.getElementById("resync-status");

  function send(target, dryRun) {
    var data = new URLSearchParams(new FormData(target));
    data.set("dry_run", dryRun ? "1" : "0");
    return fetch(target.action, {
      method: "POST", body: data, credentials: "same-origin",
      headers: { "Accept": "application/json" }
    }).then(answer);
  }

  function answer(response) {
    return response.json().then(function (body) {
      if (!response.ok) {
        throw new Error(body && body.error ? body.error.message : response.statusText);
      }
      return body;
    });
  }

  function fail(error) {
    status.textContent = "Failed: " + error.message;
  }

  function copyScope() {
    ["since", "establishments"].forEach(function (name) {
      startForm.elements[name].value = form.elements[name].value;
    });
    startForm.elements.force.value = form.elements.force.checked ? "1" : "";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    status.textContent = "Counting…";
    jobBox.hidden = true;
    send(form, true).then(function (body) {
      copyScope();
      startButton.textContent = "Initialize " + body.in_scope + " events";
      confirmBox.hidden = false;
      status.textContent = body.in_scope + " events are in scope.";
      startButton.focus();
    }).catch(fail);
  });

  startForm.addEventListener("submit", function (event) {
    event.preventDefault();
    startButton.disabled = true;
    status.textContent = "Starting…";
    send(startForm, false).then(function (job) {
      confirmBox.hidden = true;
      jobBox.hidden = false;
      follow(job.id);
    }).catch(function (error) {
      startButton.disabled = false;
      fail(error);
    });
  });

  function follow(id) {
    fetch("/ui/jobs/" + encodeURIComponent(id), {
      credentials: "same-origin", headers: { "Accept": "application/json" }
    }).then(answer).then(function (job) {
      if (job.state === "failed") {
        startButton.disabled = false;
        status.textContent = "The resync stopped: " + job.error;
        return;
      }
      if (job.state === "done") {
        bar.max = Math.max(job.marked, 1);
        bar.value = bar.max;
        startButton.disabled = false;
        status.textContent = "Done: " + job.written + " written, " + job.unchanged +
          " unchanged, " + job.failed + " failed.";
        return;
      }
      if (job.phase === "writing") {
        bar.max = Math.max(job.marked, 1);
        bar.value = job.done;
        status.textContent = job.done + " of " + job.marked + " events written or checked…";
      } else {
        bar.max = Math.max(job.total, 1);
        bar.value = job.read;
        status.textContent = "Reading the topic: " + job.read + " of " + job.total + " records…";
      }
      window.setTimeout(function () { follow(id); }, 500);
    }).catch(fail);
  }
}());

// "Test connection" without leaving the page: the answer (ok, or the error
// code, message and hint) is shown under the button. Without JavaScript the
// form posts and the page comes back with the same answer.
(function () {
  "use strict";
  var form = document.getElementById("test-form");
  if (!form) { return; }
  var button = document.getElementById("test-button");
  var result = document.getElementById("test-result");

  function line(className, text) {
    var p = document.createElement("p");
    p.className = className;
    p.textContent = text;
    return p;
  }

  function show(body) {
    result.textContent = "";
    if (body.ok) {
      result.appendChild(line("notice", "OK: " + body.provider + " reached the calendar of " +
        body.mailbox + " (nothing was written)."));
      return;
    }
    var error = line("error", " " + body.message);
    var code = document.createElement("code");
    code.textContent = body.code;
    error.insertBefore(code, error.firstChild);
    result.appendChild(error);
    if (body.hint) { result.appendChild(line("", body.hint)); }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    button.disabled = true;
    result.textContent = "Testing…";
    fetch(form.action, {
      method: "POST", body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin", headers: { "Accept": "application/json" }
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) {
          throw new Error(body && body.error ? body.error.message : response.statusText);
        }
        return body;
      });
    }).then(show).catch(function (error) {
      result.textContent = "";
      result.appendChild(line("error", "The test could not run: " + error.message));
    }).then(function () { button.disabled = false; });
  });
}());
