// The slide viewer's page (histoserve.client.slide_view): the slide as a Deep Zoom image in
// OpenSeadragon, overlay.png over it in level-0 coordinates, and the classes of the tile under the
// pointer (or pinned by a click) from tiles.json. All URLs are relative: the same page works served by
// `python -m histoserve.client slide-view` and from a static export.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { viewer: null, config: null, tiles: [], labels: [], pinned: -1, shown: -1, animating: false,
                  overlay: null, outline: null };
  window.histoserveViewer = state;

  function fail(message) {
    document.body.dataset.state = 'error';
    const error = $('error');
    error.hidden = false;
    error.textContent = message;
  }

  async function fetchJson(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // --- which tile is at a level-0 point: the last one drawn (overlay.png draws tiles.csv's rows in
  // order, the later on top), found through the grid when tiles sit on one, else by a scan.
  let byOrigin = null;
  let step = 0;
  let footprint = 0;

  function indexTiles() {
    const grid = state.config.grid || {};
    step = grid.step_level0 || 0;
    footprint = grid.footprint_level0 || 0;
    if (!(step > 0 && footprint > 0)) return;
    byOrigin = new Map();
    for (let i = 0; i < state.tiles.length; i++) {
      const [x, y, w, h] = state.tiles[i];
      if (x % step || y % step || w !== footprint || h !== footprint) { byOrigin = null; return; }
      byOrigin.set(`${x},${y}`, i);
    }
  }

  function contains(i, px, py) {
    const [x, y, w, h] = state.tiles[i];
    return px >= x && px < x + w && py >= y && py < y + h;
  }

  function tileAtLevel0(px, py) {
    let found = -1;
    if (byOrigin) {
      const last = (v) => Math.floor(v / step);
      const first = (v) => Math.max(0, Math.floor((v - footprint) / step) + 1);
      for (let row = first(py); row <= last(py); row++) {
        for (let column = first(px); column <= last(px); column++) {
          const i = byOrigin.get(`${column * step},${row * step}`);
          if (i !== undefined && i > found && contains(i, px, py)) found = i;
        }
      }
      return found;
    }
    for (let i = 0; i < state.tiles.length; i++) if (contains(i, px, py)) found = i;
    return found;
  }

  // a point in the viewer element (CSS pixels) → level-0 pixels of the slide
  function level0At(elementX, elementY) {
    const point = state.viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(elementX, elementY));
    return [point.x, point.y];
  }

  function tileAt(elementX, elementY) {
    const [x, y] = level0At(elementX, elementY);
    return tileAtLevel0(x, y);
  }

  // level-0 pixels → a rectangle in world coordinates (the slide's width is 1)
  function worldRect(x, y, w, h) {
    const width = state.config.width;
    return new OpenSeadragon.Rect(x / width, y / width, w / width, h / width);
  }

  // --- the info panel
  function show(i) {
    state.shown = i;
    const info = $('tile-info');
    const has = i >= 0;
    info.dataset.state = has ? (state.pinned === i ? 'pinned' : 'hover') : 'none';
    $('tile-hint').hidden = has;
    $('tile-fields').hidden = !has;
    $('tile-probabilities').hidden = !has;
    $('tile-pinned').hidden = state.pinned < 0;
    drawOutline(i);
    if (!has) return;
    const [x, y, w, h, tissue, label, score, ...p] = state.tiles[i];
    $('tile-label').textContent = state.labels[label];
    $('tile-score').textContent = score.toFixed(4);
    $('tile-tissue').textContent = `${(tissue * 100).toFixed(1)} %`;
    $('tile-position').textContent = `${x}, ${y}`;
    $('tile-size').textContent = `${w} × ${h} px`;
    const body = $('tile-probabilities').tBodies[0];
    body.replaceChildren(...state.labels.map((name, k) => {
      const tr = document.createElement('tr');
      tr.dataset.label = name;
      if (k === label) tr.className = 'top';
      const bar = document.createElement('div');
      bar.className = 'bar';
      bar.style.width = `${Math.round(p[k] * 100)}%`;
      bar.style.background = state.config.colours[name];
      const cells = [name, p[k].toFixed(4)].map((text) => {
        const td = document.createElement('td');
        td.textContent = text;
        return td;
      });
      const barCell = document.createElement('td');
      barCell.style.width = '40%';
      barCell.append(bar);
      tr.append(...cells, barCell);
      return tr;
    }));
  }

  function drawOutline(i) {
    const viewer = state.viewer;
    if (state.outline) { viewer.removeOverlay(state.outline); state.outline = null; }
    if (i < 0) return;
    const element = document.createElement('div');
    element.className = 'tile-outline' + (state.pinned === i ? ' pinned' : '');
    const [x, y, w, h] = state.tiles[i];
    viewer.addOverlay({ element, location: worldRect(x, y, w, h) });
    state.outline = element;
  }

  function setUpPointer() {
    const viewer = state.viewer;
    const canvas = viewer.canvas;
    const local = (event) => {
      const box = canvas.getBoundingClientRect();
      return [event.clientX - box.left, event.clientY - box.top];
    };
    canvas.addEventListener('pointermove', (event) => {
      if (state.pinned >= 0) return;
      const i = tileAt(...local(event));
      if (i !== state.shown) show(i);
    });
    canvas.addEventListener('pointerleave', () => { if (state.pinned < 0) show(-1); });
    viewer.addHandler('canvas-click', (event) => {
      if (!event.quick) return;  // a drag, not a click
      const i = tileAt(event.position.x, event.position.y);
      state.pinned = (i === state.pinned) ? -1 : i;
      show(i);
    });
  }

  function setUpOverlay() {
    const { url, level0_rect: rect } = state.config.overlay;
    const image = document.createElement('img');
    image.className = 'heatmap';
    image.alt = 'heatmap';
    image.src = url;
    state.viewer.addOverlay({ element: image, location: worldRect(...rect) });
    state.overlay = image;
    const toggle = $('overlay-toggle');
    const opacity = $('overlay-opacity');
    const apply = () => {
      image.style.visibility = toggle.checked ? 'visible' : 'hidden';
      image.style.opacity = String(Number(opacity.value) / 100);
    };
    toggle.addEventListener('change', apply);
    opacity.addEventListener('input', apply);
    apply();
  }

  function setUpLegend() {
    const list = $('legend-items');
    for (const name of state.labels) {
      const item = document.createElement('li');
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = state.config.colours[name];
      const text = document.createElement('span');
      text.textContent = name;
      item.append(swatch, text);
      list.append(item);
    }
    const verdict = state.config.slide_result;
    const counts = state.config.tile_counts;
    if (verdict && verdict.label !== null && verdict.label !== undefined) {
      $('slide-result').textContent = `slide: ${verdict.label} (${((verdict.share || 0) * 100).toFixed(1)} % of `
        + `${counts ? counts.classified : state.tiles.length} tiles)`;
    }
  }

  // Everything drawn and still: the slide's tiles all loaded and painted, no animation, the overlay decoded.
  state.idle = function () {
    const viewer = state.viewer;
    const item = viewer && viewer.world.getItemAt(0);
    return Boolean(item && item.getFullyLoaded() && !viewer.world.needsDraw() && !state.animating
      && state.overlay && state.overlay.complete && state.overlay.naturalWidth > 0);
  };
  state.tileAt = tileAt;
  state.tileAtLevel0 = tileAtLevel0;
  // level-0 pixels → CSS pixels of the page (for tests and bookmarks)
  state.pageAt = function (x, y) {
    const point = state.viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const box = state.viewer.element.getBoundingClientRect();
    return [box.left + point.x, box.top + point.y];
  };

  async function start() {
    let config, tiles;
    try {
      [config, tiles] = await Promise.all([fetchJson('viewer.json'), fetchJson('tiles.json')]);
    } catch (error) {
      fail(`cannot load the result: ${error.message}`);
      return;
    }
    state.config = config;
    state.tiles = tiles.tiles;
    state.labels = tiles.labels;
    document.title = `${config.name}: histoserve slide viewer`;
    $('title').textContent = `${config.name} (${config.slide}, ${config.width} × ${config.height} px)`;
    $('osd-version').textContent = OpenSeadragon.version.versionStr;
    indexTiles();
    setUpLegend();
    const viewer = OpenSeadragon({
      id: 'viewer',
      tileSources: config.dzi,
      prefixUrl: '',                // no navigation images are vendored: no navigation buttons
      showNavigationControl: false,
      showNavigator: true,
      navigatorPosition: 'BOTTOM_RIGHT',
      drawer: 'canvas',
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    });
    state.viewer = viewer;
    viewer.addHandler('animation-start', () => { state.animating = true; });
    viewer.addHandler('animation-finish', () => { state.animating = false; });
    viewer.addHandler('open-failed', (event) => fail(`cannot open the slide: ${event.message}`));
    viewer.addHandler('open', () => {
      setUpOverlay();
      setUpPointer();
      document.body.dataset.state = 'ready';
    });
  }

  start();
}());
