// greenfax-gateway console: the little it needs beyond plain pages (which work without it).
// 1. The newest page of the job list reloads its rows (#jobs, data-refresh in ms).
// 2. A job page on its way (queued, sending, submitted) reloads itself (#job, data-reload in ms).
// 3. An operator action asks for confirmation first (data-confirm).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const jobs = document.getElementById("jobs");
  const every = jobs ? Number(jobs.dataset.refresh) : 0;
  if (every > 0) {
    const reload = async () => {
      try {
        const answer = await fetch(location.href, {headers: {"X-Console-Part": "rows"}, credentials: "same-origin"});
        if (answer.ok) jobs.innerHTML = await answer.text();
      } catch (_) { /* the next round tries again */ }
      setTimeout(reload, every);
    };
    setTimeout(reload, every);
  }
  const job = document.getElementById("job");
  const again = job ? Number(job.dataset.reload) : 0;
  if (again > 0) setTimeout(() => location.reload(), again);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
