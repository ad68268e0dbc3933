// The trust view (the report's metrics table and verdict) and saving the view as a PNG.
// Inlined inside app.js's block (convlens.serve.app.page), so it shares its helpers and state.
  // -- the trust view ----------------------------------------------------------------------------------------
  async function startTrust() {
    try {
      const job = await json("api/jobs/trust", {image: state.image}, {method: "POST"});
      follow(job, $("trust-progress"), $("trust-state"), $("trust-cancel"), async () => {
        showTrust(await json(`api/jobs/${job.id}/result`));
      });
    } catch (err) {
      showError(err.message);
    }
  }

  function showTrust(found) {
    const verdict = $("verdict");
    verdict.hidden = !found.verdict;
    verdict.textContent = found.verdict;
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    const names = ["method", ...found.headers.map((h) => `${h.label} ${h.higher_is_better ? "↑" : "↓"}`)];
    if (found.sanity_label) names.push(`${found.sanity_label} ↓`);
    names.forEach((text, i) => {
      const th = document.createElement("th");
      th.textContent = text;
      if (i > 0 && i <= found.headers.length) th.title = found.headers[i - 1].paper;
      head.appendChild(th);
    });
    const body = table.createTBody();
    for (const row of found.rows) {
      const tr = body.insertRow();
      cell(tr, row.method);
      for (const c of row.cells) cell(tr, c.text, c.best ? "num best" : "num");
      if (row.sanity) cell(tr, `${row.sanity.text} ${row.sanity.failed ? "fail" : "pass"}`, row.sanity.failed ? "num fail" : "num");
    }
    const box = $("trust-table");
    box.innerHTML = "";
    box.appendChild(table);
    const left = Object.entries(found.skipped);
    if (!found.masked || left.length) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = (found.masked ? "" : "This image has no ground-truth mask: faithfulness scores only. ")
        + left.map(([name, why]) => `${name}: ${why}`).join("; ");
      box.appendChild(note);
    }
  }

  // -- saving the view ---------------------------------------------------------------------------------------
  function saveView() {
    const figures = [$("panel-1")].concat(state.compare ? [$("panel-2")] : []);
    const images = figures.map((f) => f.querySelector("img"));
    const width = images.reduce((sum, img) => sum + img.naturalWidth, 0) + 8 * (images.length - 1);
    const height = Math.max(...images.map((img) => img.naturalHeight)) + 22;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, width, height);
    context.fillStyle = "#000";
    context.font = "13px sans-serif";
    let left = 0;
    figures.forEach((figure, i) => {
      context.fillText(figure.querySelector("figcaption").textContent, left + 2, 15);
      context.drawImage(images[i], left, 22);
      left += images[i].naturalWidth + 8;
    });
    const link = $("download");
    link.href = canvas.toDataURL("image/png");
    link.hidden = false;
    link.click();
  }

