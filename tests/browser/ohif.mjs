// Drives OHIF v3 in the Chromium that tests/ohif.py started, through playwright-core over CDP.
//
// Input (stdin, JSON): { cdp, out, scenario, url, ...scenario fields }. Output (stdout, last line, JSON):
// { ok, error?, consoleErrors, failedRequests, ...scenario results }. Screenshots go to `out`.
// Scenarios: "worklist" (the study list shows the expected texts) and "viewer" (a study renders, scrolling
// shows other slices). Assertions about the server live in the pytest tests; this file measures the page.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const job = JSON.parse(readFileSync(0, 'utf8'));
const report = { ok: false, consoleErrors: [], failedRequests: [], steps: [] };
const STEP_MS = job.stepTimeoutMs ?? 60000;

function note(step) {
  report.steps.push(`${new Date().toISOString()} ${step}`);
}

async function shot(page, name, locator) {
  const path = join(job.out, `${name}.png`);
  await (locator ?? page).screenshot({ path });
  report.screenshots = [...(report.screenshots ?? []), path];
}

// Pixel statistics of the viewport canvas, read in the page: the canvas is copied onto a 2D canvas (whatever
// context Cornerstone rendered it with) and summarised as mean/std/non-black fraction of the luminance plus an
// 8x8 block-mean signature, so that two renderings can be compared without shipping pixels around.
async function canvasStats(page, selector) {
  return page.evaluate(sel => {
    const canvases = [...document.querySelectorAll(sel)].filter(c => c.width > 0 && c.height > 0);
    if (!canvases.length) return null;
    const src = canvases.sort((a, b) => b.width * b.height - a.width * a.height)[0];
    const w = src.width, h = src.height;
    const copy = document.createElement('canvas');
    copy.width = w;
    copy.height = h;
    const ctx = copy.getContext('2d');
    ctx.drawImage(src, 0, 0);
    const data = ctx.getImageData(0, 0, w, h).data;
    let sum = 0, sq = 0, nonBlack = 0;
    const grid = 8, blocks = new Array(grid * grid).fill(0), counts = new Array(grid * grid).fill(0);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = (y * w + x) * 4;
        const l = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
        sum += l;
        sq += l * l;
        if (l > 8) nonBlack++;
        const b = Math.min(grid - 1, Math.floor((y * grid) / h)) * grid + Math.min(grid - 1, Math.floor((x * grid) / w));
        blocks[b] += l;
        counts[b]++;
      }
    }
    const n = w * h, mean = sum / n;
    return {
      width: w,
      height: h,
      mean,
      std: Math.sqrt(Math.max(0, sq / n - mean * mean)),
      nonBlack: nonBlack / n,
      signature: blocks.map((v, i) => v / Math.max(1, counts[i])),
    };
  }, selector);
}

async function waitFor(page, what, fn, timeout = STEP_MS) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await page.waitForTimeout(250);
  }
  throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
}

// The study list: wait for OHIF's first study search to be answered (whatever its status), then for the
// expected texts.
async function worklist(page) {
  const isSearch = req => req.method() === 'GET' && new URL(req.url()).pathname.endsWith('/dicom-web/studies');
  const searched = new Promise(resolve => {
    page.on('response', res => isSearch(res.request()) && resolve(res.status()));
    page.on('requestfailed', req => isSearch(req) && resolve(`failed: ${req.failure()?.errorText}`));
  });
  await page.goto(job.url, { waitUntil: 'domcontentloaded' });
  report.searchStatus = await Promise.race([searched, page.waitForTimeout(STEP_MS).then(() => 'no study search')]);
  note(`study search: ${report.searchStatus}`);
  if (typeof report.searchStatus !== 'number') throw new Error(`study search: ${report.searchStatus}`);
  await page.waitForTimeout(500);
  const text = await waitFor(page, `study list entries ${JSON.stringify(job.expect)}`, async () => {
    const body = await page.locator('body').innerText();
    return job.expect.every(t => body.includes(t)) ? body : null;
  });
  report.text = text;
  await shot(page, `${job.name ?? 'worklist'}`);
}

async function dump(page) {
  if (!page) return;
  try {
    writeFileSync(join(job.out, `${job.name ?? job.scenario}-dom.html`), await page.content());
    await shot(page, `${job.name ?? job.scenario}-failure`);
  } catch (e) {
    report.dumpError = String(e);
  }
}

const browser = await chromium.connectOverCDP(job.cdp);
const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
const page = await context.newPage();
page.on('console', msg => {
  if (msg.type() === 'error') report.consoleErrors.push(msg.text().slice(0, 500));
});
page.on('pageerror', err => report.consoleErrors.push(`pageerror: ${String(err).slice(0, 500)}`));
page.on('requestfailed', req => report.failedRequests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`));
page.on('response', res => {
  if (res.status() >= 400) report.failedRequests.push(`${res.request().method()} ${res.url()}: ${res.status()}`);
});
try {
  if (job.scenario === 'worklist') await worklist(page);
  else if (job.scenario === 'viewer') await viewer(page);
  else if (job.scenario === 'seg') await seg(page);
  else throw new Error(`unknown scenario ${job.scenario}`);
  report.ok = true;
} catch (e) {
  report.error = String(e?.stack ?? e);
  await dump(page);
} finally {
  await context.close().catch(() => {});
  await browser.close().catch(() => {});
}
process.stdout.write(JSON.stringify(report) + '\n');
process.exit(report.ok ? 0 : 1);

// The viewer: wait until the viewport canvas shows an image, scroll with the mouse wheel over it, wait until
// both the slice indicator ("I: n (k/N)") and the canvas pixels change.
async function viewer(page) {
  const canvas = '.viewport-element canvas.cornerstone-canvas';
  await page.goto(job.url, { waitUntil: 'domcontentloaded' });
  note('viewer page loaded');
  const rendered = s => s && s.nonBlack > 0.05 && s.std > 5;
  const before = await waitFor(page, 'a rendered image in the viewport', async () => {
    const stats = await canvasStats(page, canvas);
    const slice = await sliceIndicator(page);
    return rendered(stats) && slice ? { stats, slice } : null;
  });
  // let the first image settle (a progressive configuration replaces it once the full frame arrives)
  await page.waitForTimeout(job.settleMs ?? 1500);
  before.stats = await canvasStats(page, canvas);
  before.slice = await sliceIndicator(page);
  note(`first image ${before.slice}`);
  await shot(page, `${job.name ?? 'viewer'}-before`);
  // OHIF's first-visit tour can float over the viewport; dismiss it so that the wheel reaches the image.
  const skipTour = page.getByText('Skip all');
  if (await skipTour.isVisible()) await skipTour.click();
  const box = await page.locator('.viewport-element').first().boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  for (let i = 0; i < (job.wheelSteps ?? 5); i++) {
    await page.mouse.wheel(0, 120);
    await page.waitForTimeout(150);
  }
  note('scrolled');
  const after = await waitFor(page, 'another slice after scrolling', async () => {
    const stats = await canvasStats(page, canvas);
    const slice = await sliceIndicator(page);
    const moved = slice && slice !== before.slice;
    return moved && rendered(stats) && signatureDistance(stats, before.stats) > 1 ? { stats, slice } : null;
  });
  await page.waitForTimeout(job.settleMs ?? 1500);
  after.stats = await canvasStats(page, canvas);
  after.slice = await sliceIndicator(page);
  note(`after scrolling ${after.slice}`);
  await shot(page, `${job.name ?? 'viewer'}-after`);
  report.before = before;
  report.after = after;
  report.distance = signatureDistance(before.stats, after.stats);
  if (job.thumbnails) report.thumbnails = await thumbnails(page);
}

function signatureDistance(a, b) {
  return Math.max(...a.signature.map((v, i) => Math.abs(v - b.signature[i])));
}

async function sliceIndicator(page) {
  const texts = await page.locator('[data-cy^="viewport-overlay"]').allInnerTexts();
  const match = texts.join(' ').match(/\d+\s*\(\d+\/\d+\)/);
  return match ? match[0].replace(/\s+/g, ' ') : null;
}

// Series thumbnails in the study browser: images that finished loading with real pixels.
async function thumbnails(page) {
  return waitFor(page, 'a loaded series thumbnail', async () => {
    const found = await page.evaluate(() =>
      [...document.querySelectorAll('img')]
        .filter(img => img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:'))
        .map(img => {
          const c = document.createElement('canvas');
          c.width = img.naturalWidth;
          c.height = img.naturalHeight;
          const ctx = c.getContext('2d');
          ctx.drawImage(img, 0, 0);
          const d = ctx.getImageData(0, 0, c.width, c.height).data;
          let sum = 0, sq = 0;
          for (let i = 0; i < d.length; i += 4) {
            sum += d[i];
            sq += d[i] * d[i];
          }
          const n = d.length / 4, mean = sum / n;
          return { width: img.naturalWidth, height: img.naturalHeight, mean, std: Math.sqrt(Math.max(0, sq / n - mean * mean)) };
        })
    );
    return found.length ? found : null;
  });
}

// The SEG overlay: open the study, wait for the CT image, double-click the SEG series in the study browser, confirm
// the hydration OHIF asks for ("Do you want to open this Segmentation?" / LOAD, when it asks), then wait until the
// viewport shows coloured (segment) pixels and the segmentation panel lists the segment's label.
async function seg(page) {
  const canvas = '.viewport-element canvas';
  await page.goto(job.url, { waitUntil: 'domcontentloaded' });
  note('viewer page loaded');
  const rendered = s => s && s.nonBlack > 0.05 && s.std > 5;
  await waitFor(page, 'a rendered CT image', async () => rendered(await canvasStats(page, canvas + '.cornerstone-canvas')));
  await page.waitForTimeout(job.settleMs ?? 1500);
  const skipTour = page.getByText('Skip all');
  if (await skipTour.isVisible()) await skipTour.click();
  report.colourBefore = await colourFraction(page, canvas);
  await shot(page, 'seg-before');
  const thumb = await waitFor(page, 'the SEG series in the study browser', async () => {
    const label = page.locator('[data-cy="series-modality-label"]', { hasText: /^SEG$/ });
    const t = page.locator('[data-cy^="study-browser-thumbnail"]').filter({ has: label });
    return (await t.count()) ? t.first() : null;
  });
  await thumb.dblclick();
  note('SEG thumbnail double-clicked');
  const found = await waitFor(page, `the segment overlay and the label ${job.segmentLabel}`, async () => {
    for (const name of ['Yes', 'LOAD', 'Load']) {
      const button = page.getByRole('button', { name, exact: true });
      if ((await button.count()) && (await button.first().isVisible())) {
        await button.first().click().catch(() => {});
        note(`clicked ${name}`);
      }
    }
    const colour = await colourFraction(page, canvas);
    return colour > (job.minColour ?? 0.002) ? { colour } : null;
  });
  note('segment colour in the viewport');
  await page.waitForTimeout(1000);
  // the segmentation panel (right side) lists the segment by its label
  const panel = page.locator('[data-cy="panelSegmentation-btn"]');
  const listed = async () => (await page.locator('body').innerText()).includes(job.segmentLabel);
  if (!(await listed()) && (await panel.count())) await panel.first().click();
  await waitFor(page, `the segment label ${job.segmentLabel} in the segmentation panel`, listed);
  report.colourAfter = await colourFraction(page, canvas);
  report.colourFound = found.colour;
  report.text = await page.locator('body').innerText();
  await shot(page, 'seg-after');
}

// The fraction of viewport pixels that are clearly coloured (max - min channel > 40): grey CT has none, a
// segment's fill colour does.
async function colourFraction(page, selector) {
  return page.evaluate(sel => {
    let coloured = 0, total = 0;
    for (const src of document.querySelectorAll(sel)) {
      if (!src.width || !src.height) continue;
      const copy = document.createElement('canvas');
      copy.width = src.width;
      copy.height = src.height;
      const ctx = copy.getContext('2d');
      ctx.drawImage(src, 0, 0);
      const d = ctx.getImageData(0, 0, src.width, src.height).data;
      for (let i = 0; i < d.length; i += 4) {
        const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
        if (hi - lo > 40) coloured++;
      }
      total += d.length / 4;
    }
    return total ? coloured / total : 0;
  }, selector);
}
