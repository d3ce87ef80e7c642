// Load each UI-format workflow into ComfyUI's real web editor (headless Chromium) and report, per workflow,
// the node types the editor could not find and the API prompt the editor would queue (app.graphToPrompt).
// usage: PW_DIR=<folder with node_modules/playwright-core> node editor_check.mjs URL OUT_DIR wf1.json [wf2.json ...]
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const { chromium } = createRequire(path.join(process.env.PW_DIR, 'x.js'))('playwright-core');
const [base, outDir, ...files] = process.argv.slice(2);
const profile = fs.mkdtempSync(path.join(outDir, 'profile-'));
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, viewport: { width: 1600, height: 1000 },
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-quic'],
});
const results = {};
try {
  const page = ctx.pages()[0] || await ctx.newPage();
  await page.goto(base + '/', { waitUntil: 'load', timeout: 60000 });
  const workflows = files.map((f) => JSON.parse(fs.readFileSync(f, 'utf8')));
  const types = [...new Set(workflows.flatMap((w) => w.nodes.map((n) => n.type)))];
  // The app is usable before the node definitions are registered: wait for every type the workflows use,
  // as a person would wait for the editor to finish loading.
  await page.waitForFunction((ts) => window.comfyAPI?.app?.app?.graph && document.querySelector('canvas') &&
                             ts.every((t) => window.LiteGraph?.registered_node_types?.[t]), types, { timeout: 90000 });
  for (const [i, file] of files.entries()) {
    const res = await page.evaluate(async (workflow) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(workflow);
      const unknown = app.graph.nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
      const withErrors = app.graph.nodes.filter((n) => n.has_errors).map((n) => n.type);
      const pinia = document.querySelector('#vue-app')?.__vue_app__?.config?.globalProperties?.$pinia;
      const dialogs = pinia?._s?.get('dialog')?.dialogStack?.map((d) => d.key) ?? [];
      const { output } = await app.graphToPrompt();
      return { unknown, withErrors, dialogs, output };
    }, workflows[i]);
    await page.keyboard.press('Escape');  // the first-visit template browser would hide the graph
    await page.waitForTimeout(500);
    await page.screenshot({ path: path.join(outDir, path.basename(file, '.json') + '.png') });
    results[path.basename(file, '.json')] = res;
  }
} finally {
  await ctx.close();
}
console.log(JSON.stringify(results));
