#!/usr/bin/env node
// Drives Debian's chromium (headless, through playwright-core) through the slide viewer for
// tests/client/test_slide_view.py, which judges what this script saw:
//   node check_viewer.js PLAN.json
// PLAN: { chromium, url, exportUrl, out, artefact, views: [{name, bounds?: [x, y, w, h] level-0}],
//         points: [[x, y], ...] level-0, hover: [x, y], click: [x, y], away: [x, y] }
// For each view, with the overlay on and off: OUT/<view>-on.png, OUT/<view>-off.png and the page
// positions of `points`; then hover and click results; then the export's home view. Prints one JSON
// object; exits 1 with the page's error when it never gets ready.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const VIEWPORT = { width: 1200, height: 800 };

async function ready(page) {
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 20000 });
  const error = await page.evaluate(() => document.body.dataset.state === 'error' && document.getElementById('error').textContent);
  if (error) throw new Error(`the page says: ${error}`);
}

// drawn and still: every slide tile loaded and painted, no animation, overlay decoded; then two frames
async function idle(page) {
  await page.waitForFunction(() => window.histoserveViewer.idle(), null, { timeout: 20000, polling: 50 });
  await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))));
  await page.waitForFunction(() => window.histoserveViewer.idle(), null, { timeout: 20000, polling: 50 });
}

async function setOverlay(page, on) {
  await page.setChecked('#overlay-toggle', on);
  await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))));
}

const positions = (page, points) => page.evaluate((pts) => pts.map(([x, y]) => window.histoserveViewer.pageAt(x, y)), points);

async function tileInfo(page) {
  return page.evaluate(() => ({
    state: document.getElementById('tile-info').dataset.state,
    label: document.getElementById('tile-label').textContent,
    score: document.getElementById('tile-score').textContent,
    position: document.getElementById('tile-position').textContent,
    probabilities: Object.fromEntries([...document.querySelectorAll('#tile-probabilities tbody tr')]
      .map((tr) => [tr.dataset.label, tr.children[1].textContent])),
  }));
}

async function main() {
  const browser = await chromium.launch({ executablePath: plan.chromium, headless: true });
  const result = { views: {}, console: [] };
  try {
    const page = await browser.newPage({ viewport: VIEWPORT, deviceScaleFactor: 1 });
    page.on('console', (message) => { if (message.type() === 'error') result.console.push(message.text()); });
    page.on('pageerror', (error) => result.console.push(String(error)));
    await page.goto(plan.url);
    await ready(page);
    await idle(page);
    result.navigator = await page.evaluate(() => {
      const box = window.histoserveViewer.viewer.navigator.element.getBoundingClientRect();
      return [box.left, box.top, box.right, box.bottom];
    });
    result.viewer = await page.evaluate(() => {
      const box = window.histoserveViewer.viewer.element.getBoundingClientRect();
      return [box.left, box.top, box.right, box.bottom];
    });
    for (const view of plan.views) {
      if (view.bounds) {
        await page.evaluate(([x, y, w, h]) => {
          const viewer = window.histoserveViewer.viewer;
          const width = window.histoserveViewer.config.width;
          viewer.viewport.fitBounds(new OpenSeadragon.Rect(x / width, y / width, w / width, h / width), true);
        }, view.bounds);
      } else {
        await page.evaluate(() => window.histoserveViewer.viewer.viewport.goHome(true));
      }
      await idle(page);
      const shots = {};
      for (const on of [true, false]) {
        await setOverlay(page, on);
        shots[on ? 'on' : 'off'] = path.join(plan.out, `${view.name}-${on ? 'on' : 'off'}.png`);
        await page.screenshot({ path: shots[on ? 'on' : 'off'] });
      }
      await setOverlay(page, true);
      result.views[view.name] = { positions: await positions(page, plan.points), shots };
    }
    await page.evaluate(() => window.histoserveViewer.viewer.viewport.goHome(true));
    await idle(page);
    const [hoverX, hoverY] = (await positions(page, [plan.hover]))[0];
    await page.mouse.move(hoverX, hoverY);
    await page.waitForFunction(() => document.getElementById('tile-info').dataset.state !== 'none', null, { timeout: 5000 });
    result.hover = await tileInfo(page);
    const [awayX, awayY] = (await positions(page, [plan.away]))[0];
    await page.mouse.move(awayX, awayY);
    result.away = await tileInfo(page);
    const [clickX, clickY] = (await positions(page, [plan.click]))[0];
    await page.mouse.click(clickX, clickY);
    await page.mouse.move(hoverX, hoverY, { steps: 4 });  // pinned: moving on changes nothing
    result.clicked = await tileInfo(page);
    await idle(page);
    fs.mkdirSync(path.dirname(plan.artefact), { recursive: true });
    await page.screenshot({ path: plan.artefact });

    const exported = await browser.newPage({ viewport: VIEWPORT, deviceScaleFactor: 1 });
    exported.on('pageerror', (error) => result.console.push(`export: ${error}`));
    await exported.goto(plan.exportUrl);
    await ready(exported);
    await idle(exported);
    result.export = { positions: await positions(exported, plan.points), shot: path.join(plan.out, 'export-on.png') };
    await exported.screenshot({ path: result.export.shot });
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
