"""The demo page served at ``/`` by ``fuxi-mme serve``: pick items (by title where the dataset
has titles), see the recommendations. Plain HTML and JavaScript, no external resources."""

DEMO_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fuxi-mme demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } .muted { color: #666; font-size: .9rem; }
 .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 2rem; }
 input[type=text] { width: 100%; padding: .4rem; font-size: 1rem; box-sizing: border-box; }
 ul { padding-left: 1.2rem; } li { margin: .2rem 0; }
 button { cursor: pointer; } #suggestions button { border: 0; background: none; color: #0645ad; text-align: left; padding: 0; }
 #error { color: #b00020; white-space: pre-wrap; } .score { color: #666; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>fuxi-mme: what next?</h1>
<p class="muted" id="model">loading model...</p>
<div class="cols">
 <div>
  <h2>History (oldest first)</h2>
  <input type="text" id="search" placeholder="type a title or an item id" autocomplete="off">
  <ul id="suggestions"></ul>
  <ol id="history"></ol>
  <p><label>k <input type="number" id="k" value="10" min="1" style="width:5rem"></label>
     <label><input type="checkbox" id="exclude" checked> exclude seen</label></p>
  <p><button id="recommend">Recommend</button> <button id="clear">Clear</button></p>
 </div>
 <div>
  <h2>Recommendations</h2>
  <p id="error"></p>
  <ol id="results"></ol>
 </div>
</div>
<script>
const hist = [];
const $ = (id) => document.getElementById(id);
function label(x) { return x.title ? x.title + " (" + x.item + ")" : String(x.item); }
function renderHistory() {
  $("history").innerHTML = "";
  hist.forEach((x, i) => {
    const li = document.createElement("li");
    li.textContent = label(x) + " ";
    const rm = document.createElement("button");
    rm.textContent = "remove"; rm.onclick = () => { hist.splice(i, 1); renderHistory(); };
    li.appendChild(rm); $("history").appendChild(li);
  });
}
let timer = null;
$("search").addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    const q = $("search").value;
    const r = await fetch("/items?limit=10&q=" + encodeURIComponent(q));
    const items = await r.json();
    $("suggestions").innerHTML = "";
    items.forEach((x) => {
      const li = document.createElement("li"); const b = document.createElement("button");
      b.textContent = label(x); b.dataset.item = x.item;
      b.onclick = () => { hist.push(x); renderHistory(); $("search").value = ""; $("suggestions").innerHTML = ""; };
      li.appendChild(b); $("suggestions").appendChild(li);
    });
  }, 150);
});
$("clear").onclick = () => { hist.length = 0; renderHistory(); $("results").innerHTML = ""; $("error").textContent = ""; };
$("recommend").onclick = async () => {
  $("error").textContent = ""; $("results").innerHTML = "";
  const body = { history: hist.map((x) => x.item), k: parseInt($("k").value, 10), exclude_seen: $("exclude").checked };
  const r = await fetch("/recommend", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) { $("error").textContent = data.error || JSON.stringify(data); return; }
  data.items.forEach((x) => {
    const li = document.createElement("li");
    li.innerHTML = "";
    li.appendChild(document.createTextNode(label(x) + " "));
    const s = document.createElement("span"); s.className = "score"; s.textContent = x.score.toFixed(3);
    li.appendChild(s); $("results").appendChild(li);
  });
};
fetch("/model").then((r) => r.json()).then((m) => {
  $("model").textContent = m.model + " trained on " + m.dataset + " (" + m.items + " items, preset " + m.preset + ")";
});
</script>
</body>
</html>
"""
