// A small line chart in inline SVG: shares (0..1) per day, one line per series. No library.
const NS = "http://www.w3.org/2000/svg";

function el(name, attributes = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// series: [{label, className, values: [share or null per point]}]; points: labels of the x axis.
export function lineChart({ title, points, series }) {
  const width = 640, height = 240, left = 44, right = 12, top = 12, bottom = 36;
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart", "aria-labelledby": "chart-title" });
  svg.append(el("title", { id: "chart-title" }, title));
  const x = (i) => left + (points.length < 2 ? (width - left - right) / 2 : (i * (width - left - right)) / (points.length - 1));
  const y = (share) => top + (1 - share) * (height - top - bottom);
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(el("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick), class: "grid" }));
    svg.append(el("text", { x: left - 6, y: y(tick) + 4, class: "axis", "text-anchor": "end" }, `${tick * 100}%`));
  }
  const step = Math.max(1, Math.ceil(points.length / 6));
  points.forEach((label, i) => {
    if (i % step === 0 || i === points.length - 1) {
      svg.append(el("text", { x: x(i), y: height - bottom + 18, class: "axis", "text-anchor": "middle" }, label.slice(5)));
    }
  });
  for (const line of series) {
    const coords = line.values.map((v, i) => (v === null ? null : [x(i), y(v)])).filter(Boolean);
    if (coords.length > 1) {
      svg.append(el("polyline", { points: coords.map((c) => c.join(",")).join(" "), class: `line ${line.className}` }));
    }
    for (const [cx, cy] of coords) svg.append(el("circle", { cx, cy, r: 3.5, class: `dot ${line.className}` }));
  }
  return svg;
}
