/* ldm-jobs gallery. Opens from disk: data comes inline (the summary) or as <script src>
   files that call GALLERY_GROUP / GALLERY_ERRORS, never through the Fetch API, which
   browsers refuse for file:// pages. The state lives in the URL's hash, so Back and links work. */
(function () {
  "use strict";
  const S = JSON.parse(document.getElementById("summary").textContent);
  const $ = (id) => document.getElementById(id);
  const groups = new Map();   // group number -> Promise of the decoded group
  const waiting = new Map();  // group number -> resolve function
  let errorsLoaded = null;
  let resultsCache = { key: null, list: null };
  let state = {};

  // ---- data files --------------------------------------------------------------------
  function loadScript(src, onError) {
    const script = document.createElement("script");
    script.src = src;
    script.charset = "utf-8";
    script.onerror = onError;
    document.head.appendChild(script);
  }

  function decodeColumn(column) {
    if (Array.isArray(column)) return column;
    return column.c.map((code) => column.d[code]);
  }

  window.GALLERY_GROUP = function (content) {
    const columns = {};
    for (const name of Object.keys(content.columns)) columns[name] = decodeColumn(content.columns[name]);
    const group = {
      first: content.first, count: content.count, shard: decodeColumn(content.shard),
      row: content.row, ext: decodeColumn(content.ext), columns: columns,
      imageError: content.image_error || null, lowerPrompts: null,
    };
    const resolve = waiting.get(content.group);
    if (resolve) { waiting.delete(content.group); resolve(group); }
  };

  function loadGroup(number) {
    if (!groups.has(number)) {
      groups.set(number, new Promise((resolve, reject) => {
        waiting.set(number, resolve);
        const name = "data/group-" + String(number).padStart(5, "0") + ".js";
        loadScript(name, () => { groups.delete(number); reject(new Error("cannot load " + name)); });
      }));
    }
    return groups.get(number);
  }

  async function loadGroups(numbers, progress) {
    // A few at a time: the browser reads them in parallel, the page stays responsive.
    const queue = numbers.slice();
    let done = 0;
    async function worker() {
      while (queue.length) {
        await loadGroup(queue.shift());
        done += 1;
        if (progress) progress(done, numbers.length);
      }
    }
    await Promise.all(Array.from({ length: Math.min(6, queue.length) }, worker));
  }

  async function rowAt(index) {
    const group = await loadGroup(Math.floor(index / S.group_rows));
    return { group: group, i: index - group.first };
  }

  // ---- values, tokens and filters (the same reading as gallery/index.py) --------------
  function elementToken(item) {
    if (item && typeof item === "object" && !Array.isArray(item)) {
      return item.name || item.path || JSON.stringify(item);
    }
    if (Array.isArray(item) && item.length) return item[0];
    return item;
  }

  function tokens(value) {
    if (Array.isArray(value)) {
      const list = value.map(elementToken);
      return list.length ? list : [null];
    }
    return [value];
  }

  const tokenKey = (token) => JSON.stringify(token === undefined ? null : token);
  const tokenLabel = (token) => (token === null || token === undefined ? "(none)" : String(token));

  function show(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) {
      return value.map((item) => {
        if (item && typeof item === "object" && !Array.isArray(item)) {
          const name = item.name || item.path;
          if (name !== undefined && item.weight !== undefined) return name + " (" + item.weight + ")";
          return JSON.stringify(item);
        }
        return Array.isArray(item) ? item.join(": ") : String(item);
      }).join(", ");
    }
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // ---- the hash: view, page, query, filters, open item ---------------------------------
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const filters = {};
    for (const [key, value] of params) if (key.startsWith("f.")) filters[key.slice(2)] = value;
    return {
      view: params.get("view") || "images",
      page: Math.max(1, parseInt(params.get("page") || "1", 10) || 1),
      q: params.get("q") || "",
      filters: filters,
      item: params.has("item") ? parseInt(params.get("item"), 10) : null,
    };
  }

  function hashOf(next) {
    const params = new URLSearchParams();
    if (next.view !== "images") params.set("view", next.view);
    if (next.q) params.set("q", next.q);
    for (const column of Object.keys(next.filters).sort()) params.set("f." + column, next.filters[column]);
    if (next.page > 1) params.set("page", String(next.page));
    if (next.item !== null && next.item !== undefined) params.set("item", String(next.item));
    return "#" + params.toString();
  }

  function go(changes) {
    location.hash = hashOf(Object.assign({}, state, changes));
  }

  // ---- results: every row, or the rows matching the search and filters -----------------
  function queryKey(s) {
    return JSON.stringify([s.q.trim().toLowerCase(), s.filters]);
  }

  function matcher(s) {
    const words = s.q.toLowerCase().split(/\s+/).filter(Boolean);
    const filters = Object.entries(s.filters);
    return function (group, i) {
      if (words.length) {
        if (!group.lowerPrompts) {
          const prompts = group.columns.prompt || [];
          const ids = group.columns.id || [];
          group.lowerPrompts = prompts.map((p, k) => (String(p || "") + " " + String(ids[k] || "")).toLowerCase());
        }
        const text = group.lowerPrompts[i] || "";
        for (const word of words) if (!text.includes(word)) return false;
      }
      for (const [column, key] of filters) {
        const values = group.columns[column];
        const cell = values ? values[i] : null;
        if (!tokens(cell).some((token) => tokenKey(token) === key)) return false;
      }
      return true;
    };
  }

  async function results(s) {
    // null: no search, so result number k is row k and nothing needs scanning.
    if (!s.q.trim() && !Object.keys(s.filters).length) return null;
    const key = queryKey(s);
    if (resultsCache.key === key) return resultsCache.list;
    const numbers = S.groups.map((_, g) => g);
    await loadGroups(numbers, (done, all) => { $("status").textContent = "Searching: " + done + " of " + all + " index files read"; });
    const test = matcher(s);
    const list = [];
    for (const g of numbers) {
      const group = await loadGroup(g);
      for (let i = 0; i < group.count; i++) if (test(group, i)) list.push(group.first + i);
    }
    resultsCache = { key: key, list: list };
    return list;
  }

  const resultCount = (list) => (list === null ? S.rows : list.length);
  const resultAt = (list, k) => (list === null ? k : list[k]);
  const positionOf = (list, index) => (list === null ? index : list.indexOf(index));

  // ---- the images view -------------------------------------------------------------------
  function buildFacets() {
    const holder = $("facets");
    for (const facet of S.facets) {
      const label = document.createElement("label");
      label.textContent = facet.column + " ";
      const select = document.createElement("select");
      select.dataset.column = facet.column;
      select.add(new Option("all", ""));
      for (const [token, count] of facet.values) {
        select.add(new Option(tokenLabel(token) + " (" + count + ")", tokenKey(token)));
      }
      label.appendChild(select);
      holder.appendChild(label);
    }
  }

  function readForm() {
    const filters = {};
    for (const select of document.querySelectorAll("#facets select")) {
      if (select.value) filters[select.dataset.column] = select.value;
    }
    return { q: $("q").value.trim(), filters: filters, page: 1, item: null };
  }

  function syncForm(s) {
    if (document.activeElement !== $("q")) $("q").value = s.q;
    for (const select of document.querySelectorAll("#facets select")) {
      select.value = s.filters[select.dataset.column] || "";
    }
  }

  function pagerHtml(page, pages) {
    const link = (label, target, rel) => {
      const disabled = target < 1 || target > pages || target === page;
      return '<a href="' + hashOf(Object.assign({}, state, { page: target, item: null })) + '"' +
        (rel ? ' rel="' + rel + '"' : "") + (disabled ? ' aria-disabled="true" tabindex="-1"' : "") +
        ">" + label + "</a>";
    };
    return link("&laquo; first", 1) + link("&lsaquo; previous", page - 1, "prev") +
      "<span>page " + page + " of " + pages + "</span>" +
      link("next &rsaquo;", page + 1, "next") + link("last &raquo;", pages);
  }

  function thumbItem(group, i, index) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = hashOf(Object.assign({}, state, { item: index }));
    a.className = "thumb";
    a.dataset.index = String(index);
    const prompt = String((group.columns.prompt || [])[i] || "");
    const id = String((group.columns.id || [])[i] ?? "");
    if (group.ext[i]) {
      const img = document.createElement("img");
      img.src = "thumbs/" + group.shard[i] + "/" + String(group.row[i]).padStart(6, "0") + ".webp";
      img.alt = prompt || "image " + id;
      img.loading = "lazy";
      img.decoding = "async";
      const width = (group.columns.width || [])[i], height = (group.columns.height || [])[i];
      if (width && height) { img.width = width; img.height = height; }
      if (Math.max(width || 0, height || 0) < 150) img.className = "pixelated";
      a.appendChild(img);
    } else {
      const box = document.createElement("span");
      box.className = "no-image";
      box.textContent = (group.imageError && group.imageError[i]) || "no image";
      a.appendChild(box);
    }
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.innerHTML = "<b></b> <span></span>";
    caption.firstChild.textContent = id;
    caption.lastChild.textContent = prompt;
    caption.title = prompt;
    a.appendChild(caption);
    li.appendChild(a);
    return li;
  }

  let renderSerial = 0;
  async function renderImages(s) {
    const serial = ++renderSerial;
    const started = performance.now();
    syncForm(s);
    const list = await results(s);
    if (serial !== renderSerial) return;
    const total = resultCount(list);
    const pages = Math.max(1, Math.ceil(total / S.page_size));
    const page = Math.min(s.page, pages);
    const first = (page - 1) * S.page_size;
    const indices = [];
    for (let k = first; k < Math.min(total, first + S.page_size); k++) indices.push(resultAt(list, k));
    const needed = Array.from(new Set(indices.map((index) => Math.floor(index / S.group_rows))));
    await loadGroups(needed);
    if (serial !== renderSerial) return;
    const grid = $("grid");
    const fragment = document.createDocumentFragment();
    for (const index of indices) {
      const where = await rowAt(index);
      fragment.appendChild(thumbItem(where.group, where.i, index));
    }
    grid.replaceChildren(fragment);
    for (const pager of document.querySelectorAll(".pager")) pager.innerHTML = pagerHtml(page, pages);
    const searched = list !== null;
    $("status").textContent = searched
      ? total + " matching image" + (total === 1 ? "" : "s") + " of " + S.rows +
        (total ? "; showing " + (first + 1) + "-" + (first + indices.length) : "")
      : "Showing " + (total ? (first + 1) + "-" + (first + indices.length) + " of " : "") + total + " images";
    document.body.dataset.page = String(page);
    document.body.dataset.results = String(total);
    document.body.dataset.rendered = String(performance.now() - started);  // for benchmarks
  }

  // ---- the detail view ------------------------------------------------------------------
  let lastFocus = null;
  async function renderDetail(s) {
    const box = $("detail");
    if (s.item === null || isNaN(s.item) || s.item < 0 || s.item >= S.rows) {
      if (!box.hidden) {
        box.hidden = true;
        const back = document.querySelector('#grid a[data-index="' + (lastFocus ?? "") + '"]');
        if (back) back.focus();
      }
      return;
    }
    const where = await rowAt(s.item);
    const group = where.group, i = where.i;
    const prompt = String((group.columns.prompt || [])[i] || "");
    const id = String((group.columns.id || [])[i] ?? "");
    $("detail-title").textContent = id;
    const figure = $("detail-figure");
    figure.replaceChildren();
    if (group.ext[i]) {
      const img = document.createElement("img");
      const file = group.shard[i] + "/" + String(group.row[i]).padStart(6, "0");
      // full_images "none": the site keeps thumbnails only; the image itself is in the output
      const thumbOnly = S.full_images === "none";
      img.src = thumbOnly ? "thumbs/" + file + ".webp" : "images/" + file + "." + group.ext[i];
      img.alt = prompt || "image " + id;
      const width = (group.columns.width || [])[i], height = (group.columns.height || [])[i];
      if (thumbOnly && width && height) { img.width = width; img.height = height; }
      if (Math.max(width || 0, height || 0) < 256) img.className = "pixelated";
      figure.appendChild(img);
      if (thumbOnly) {
        const note = document.createElement("p");
        note.className = "note";
        note.id = "detail-thumb-note";
        note.textContent = "a thumbnail: the image itself is row " + group.row[i] + " of " +
          ((S.shard_files || {})[group.shard[i]] || group.shard[i]) + " in the output";
        figure.appendChild(note);
      }
    } else {
      figure.textContent = (group.imageError && group.imageError[i]) || "no image";
    }
    const table = $("detail-fields");
    table.replaceChildren();
    const addRow = (name, value, node) => {
      const tr = table.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = name;
      tr.appendChild(th);
      const td = tr.insertCell();
      if (node) td.appendChild(node); else td.textContent = value;
    };
    for (const column of S.columns) addRow(column, show((group.columns[column] || [])[i]));
    const file = S.shard_files[group.shard[i]] || group.shard[i];
    const link = document.createElement("a");
    link.href = S.link + "/" + file;
    link.textContent = file;
    const where2 = document.createElement("span");
    where2.appendChild(link);
    where2.appendChild(document.createTextNode(", row " + group.row[i]));
    addRow("shard, row", "", where2);
    const list = await results(s);
    const position = positionOf(list, s.item);
    $("detail-prev").disabled = position <= 0;
    $("detail-next").disabled = position < 0 || position >= resultCount(list) - 1;
    if (box.hidden) {
      lastFocus = s.item;
      box.hidden = false;
      $("detail-close").focus();
    } else {
      lastFocus = s.item;
    }
  }

  async function step(delta) {
    const list = await results(state);
    const position = positionOf(list, state.item) + delta;
    if (position < 0 || position >= resultCount(list)) return;
    go({ item: resultAt(list, position), page: Math.floor(position / S.page_size) + 1 });
  }

  // ---- the rejected rows ------------------------------------------------------------------
  window.GALLERY_ERRORS = function (content) { if (errorsLoaded) errorsLoaded.resolve(content); };

  function loadErrors() {
    if (!errorsLoaded) {
      let resolve, reject;
      const promise = new Promise((yes, no) => { resolve = yes; reject = no; });
      errorsLoaded = { promise: promise, resolve: resolve };
      loadScript("data/errors.js", () => reject(new Error("cannot load data/errors.js")));
    }
    return errorsLoaded.promise;
  }

  async function renderErrors() {
    const holder = $("errors-list");
    if (holder.dataset.done) return;
    const content = await loadErrors();
    holder.dataset.done = "1";
    $("errors-status").textContent = content.total
      ? content.total + " rejected row" + (content.total === 1 ? "" : "s") + ", " + content.reasons.length + " reason" + (content.reasons.length === 1 ? "" : "s") +
        (content.other_reasons_rows ? "; " + content.other_reasons_rows + " more rows under other reasons" : "")
      : "No rows were rejected.";
    content.reasons.forEach((entry, n) => {
      const details = document.createElement("details");
      details.className = "reason";
      details.open = n < 5;
      const summary = document.createElement("summary");
      summary.innerHTML = '<span class="count"></span> <span class="text"></span>';
      summary.firstChild.textContent = String(entry.count);
      summary.lastChild.textContent = entry.reason;
      details.appendChild(summary);
      const table = document.createElement("table");
      table.className = "rows";
      table.innerHTML = "<thead><tr><th>id</th><th>input row</th><th>shard</th><th>prompt</th></tr></thead>";
      const body = table.createTBody();
      for (const row of entry.rows) {
        const tr = body.insertRow();
        for (const key of ["id", "row", "shard", "prompt"]) tr.insertCell().textContent = show(row[key]);
      }
      details.appendChild(table);
      if (entry.count > entry.rows.length) {
        const more = document.createElement("p");
        more.className = "note";
        more.textContent = "and " + (entry.count - entry.rows.length) + " more (errors.parquet holds them all)";
        details.appendChild(more);
      }
      holder.appendChild(details);
    });
  }

  // ---- wiring -------------------------------------------------------------------------------
  async function render() {
    state = readHash();
    for (const view of ["images", "errors", "story"]) {
      $("view-" + view).hidden = state.view !== view;
      const tab = $("tab-" + view);
      if (state.view === view) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
    }
    try {
      if (state.view === "images") await renderImages(state);
      if (state.view === "errors") await renderErrors();
      await renderDetail(state);
    } catch (error) {
      $("status").textContent = "Error: " + error.message;
      throw error;
    }
  }

  function moveFocus(event) {
    const links = Array.from(document.querySelectorAll("#grid a.thumb"));
    const at = links.indexOf(document.activeElement);
    if (at < 0) return false;
    const top = links[0].offsetTop;
    let columns = links.findIndex((link) => link.offsetTop !== top);
    if (columns < 0) columns = links.length;
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns,
                    Home: -at, End: links.length - 1 - at };
    if (!(event.key in moves)) return false;
    const target = links[Math.min(links.length - 1, Math.max(0, at + moves[event.key]))];
    target.focus();
    return true;
  }

  function keepFocusIn(box, event) {
    // A modal dialog: Tab and Shift+Tab cycle through its own controls.
    const controls = Array.from(box.querySelectorAll("button:not([disabled]), a[href]"));
    if (!controls.length) return;
    const first = controls[0], last = controls[controls.length - 1];
    const at = document.activeElement;
    if (!box.contains(at) || (event.shiftKey ? at === first : at === last)) {
      (event.shiftKey ? last : first).focus();
      event.preventDefault();
    }
  }

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (!$("detail").hidden) {
      if (event.key === "Escape") { go({ item: null }); event.preventDefault(); }
      else if (event.key === "ArrowLeft") { step(-1); event.preventDefault(); }
      else if (event.key === "ArrowRight") { step(1); event.preventDefault(); }
      else if (event.key === "Tab") keepFocusIn($("detail"), event);
      return;
    }
    if (typing || state.view !== "images") return;
    if (event.key === "/") { $("q").focus(); event.preventDefault(); return; }
    if (event.key === "PageDown") { go({ page: state.page + 1, item: null }); event.preventDefault(); return; }
    if (event.key === "PageUp" && state.page > 1) { go({ page: state.page - 1, item: null }); event.preventDefault(); return; }
    if (moveFocus(event)) event.preventDefault();
  });

  $("search").addEventListener("submit", (event) => { event.preventDefault(); go(readForm()); });
  $("facets").addEventListener("change", () => go(readForm()));
  $("clear").addEventListener("click", () => { $("q").value = ""; go({ q: "", filters: {}, page: 1, item: null }); });
  $("detail-close").addEventListener("click", () => go({ item: null }));
  $("detail-prev").addEventListener("click", () => step(-1));
  $("detail-next").addEventListener("click", () => step(1));
  $("detail").addEventListener("click", (event) => { if (event.target === $("detail")) go({ item: null }); });
  window.addEventListener("hashchange", render);

  $("counts").textContent = S.rows + " images" + (S.rejected ? ", " + S.rejected + " rejected rows" : "") +
    (S.pending ? ", " + S.pending + " rows not yet done" : "") + (S.model ? " - model " + S.model : "") +
    (S.complete ? "" : " - the job has not finished (no _SUCCESS)");
  $("tab-errors").textContent = "Rejected rows (" + S.rejected + ")";
  $("written").textContent = "Written " + S.written + " from " + S.output + " by ldm-jobs show --html.";
  buildFacets();
  render();
})();
