/* siterecovery portal: live job progress and the Re-Protect dialog's retention volume picker.
   Plain JavaScript, no dependencies; every page also works without it. */
"use strict";

function label(value) {
  const text = String(value).replace(/[-_]/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function setBadge(holder, value, kind) {
  if (!holder) return;
  let badge = holder.querySelector(".badge");
  if (!badge) {
    badge = document.createElement("span");
    holder.replaceChildren(badge);
  }
  badge.className = "badge " + kind + "-" + value;
  badge.textContent = label(value);
}

function setProgress(bar, percent) {
  if (!bar) return;
  bar.value = percent;
  bar.textContent = Math.round(percent) + " %";
}

function applyJob(root, job) {
  setBadge(root.querySelector('[data-job-field="state"]'), job.state, "job");
  setProgress(root.querySelector('progress[data-progress="job"]'), job.percent);
  const pct = root.querySelector('[data-job-field="percent"]');
  if (pct) pct.textContent = Math.round(job.percent) + " %";
  for (const task of job.tasks) {
    const row = root.querySelector('[data-task="' + task.ordinal + '"]');
    if (!row) continue;
    setBadge(row.querySelector('[data-task-field="state"]'), task.state, "task");
    setProgress(row.querySelector('progress[data-progress="task-' + task.ordinal + '"]'), task.percent);
    const tp = row.querySelector('[data-task-field="percent"]');
    if (tp) tp.textContent = Math.round(task.percent) + " %";
    const details = row.querySelector('[data-task-field="details"]');
    if (details && task.message) {
      let msg = details.querySelector(".message");
      if (!msg) {
        msg = document.createElement("div");
        msg.className = "message small";
        details.appendChild(msg);
      }
      msg.textContent = task.message;
    }
  }
}

const FINISHED = ["succeeded", "failed", "cancelled"];

function pollJob(root) {
  const id = root.dataset.jobPoll;
  const shown = root.dataset.jobState;
  const live = root.querySelector("[data-job-live]");
  if (FINISHED.includes(shown)) return;
  let busy = false;
  const timer = setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch("/portal/api/jobs/" + encodeURIComponent(id), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (!response.ok) {
        if (live) live.textContent = "Live updates paused (" + response.status + ").";
        return;
      }
      const job = await response.json();
      applyJob(root, job);
      if (live) live.textContent = "Updated " + new Date().toLocaleTimeString();
      // A new state can change what the page offers (Resume, Cancel, errors): render it anew.
      const settled = job.state === shown || (shown === "queued" && job.state === "running");
      if (!settled) {
        clearInterval(timer);
        window.location.reload();
      }
    } catch (err) {
      if (live) live.textContent = "Live updates paused: " + err;
    } finally {
      busy = false;
    }
  }, 1000);
}

function retentionPicker(select) {
  const form = select.form;
  const update = () => {
    for (const box of form.querySelectorAll("[data-retention-for]")) {
      const on = box.dataset.retentionFor === select.value;
      box.hidden = !on;
      for (const field of box.querySelectorAll("select")) field.disabled = !on;
    }
  };
  select.addEventListener("change", update);
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const root of document.querySelectorAll("[data-job-poll]")) pollJob(root);
  for (const select of document.querySelectorAll("select[data-controls-retention]")) retentionPicker(select);
});
