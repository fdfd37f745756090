"""The patient page's HTML template (``string.Template``; ``$name`` placeholders).

Kept as a Python module so that it ships with the package like any other source file. The page
is self-contained: inline CSS, images as ``data:`` URIs, no script and nothing loaded from
elsewhere (the Content-Security-Policy forbids it, so a stray reference fails loudly)."""

from __future__ import annotations

from string import Template

PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
  color: #1f2a33; background: #f7f8fa; line-height: 1.5; }
main { max-width: 980px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5em; margin: 0 0 4px; }
h2 { font-size: 1.15em; margin: 28px 0 8px; border-bottom: 1px solid #d5dbe1; }
.sub { color: #5b6b78; margin: 0 0 16px; }
.notice { background: #fff4e0; border-left: 4px solid #e6a23c; padding: 10px 14px;
  margin: 16px 0; }
.summary p { margin: 6px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #d5dbe1; border-radius: 6px; padding: 10px 14px;
  min-width: 180px; }
.card .label { color: #5b6b78; font-size: 0.85em; }
.card .value { font-size: 1.3em; font-weight: 600; }
table { border-collapse: collapse; background: #fff; margin: 8px 0; }
th, td { border: 1px solid #d5dbe1; padding: 4px 10px; text-align: left; }
th { background: #eef1f4; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.own td { background: #fdecea; font-weight: 600; }
img { max-width: 100%; height: auto; }
img.heatmap { max-width: 720px; border: 1px solid #d5dbe1; }
figure { margin: 8px 0; }
figcaption { color: #5b6b78; font-size: 0.85em; }
.legend { height: 12px; width: 260px; border: 1px solid #999; background: $gradient; }
.legend-row { display: flex; gap: 8px; align-items: center; font-size: 0.85em; }
.protos { display: flex; flex-wrap: wrap; gap: 12px; }
.proto { background: #fff; border: 1px solid #d5dbe1; border-radius: 6px; padding: 8px;
  width: 290px; }
.proto img { width: 64px; height: 64px; margin-right: 2px; image-rendering: auto; }
.method { color: #5b6b78; font-size: 0.85em; }
</style>
</head>
<body>
<main>
<h1>$title</h1>
<p class="sub">$subtitle</p>
<div class="notice" id="not-a-diagnosis">$disclaimer</div>

<h2>In plain words</h2>
<div class="summary" id="summary">
$summary
</div>

<h2>The prediction</h2>
<div class="cards" id="prediction">
$cards
</div>
<p class="method">$uncertainty_method</p>

<h2>Where the patient sits among the cohort's risk groups</h2>
$km
<h2>Where the model looked</h2>
$heatmaps
<h2>Tissue patterns that moved this patient's score</h2>
$prototypes
<h2>How these numbers were made</h2>
<p class="method">$method</p>
</main>
</body>
</html>
"""
)
