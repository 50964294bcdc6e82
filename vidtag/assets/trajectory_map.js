// vidtag trajectory map: draws the data vidtag.viz.trajectory_map_html puts in #vidtag-data with the
// inlined Leaflet. Drawn land, borders and place names lie beneath the OpenStreetMap tiles, so the map
// reads the same with no network (the tiles then fail and stay hidden) as with it.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("vidtag-data").textContent);
  var map = L.map("map", { zoomSnap: 0.25 });
  map.fitBounds(D.bounds, { animate: false });  // the view first: every renderer is laid out for it
  map.attributionControl.setPrefix("Leaflet");

  // Panes fix the stacking whatever is toggled: outline < tiles < places < truth < Phase I < candidates < final.
  var panes = { outline: 150, places: 390, truth: 410, phase1: 420, candidates: 425, final: 430 };
  Object.keys(panes).forEach(function (name) {
    map.createPane(name).style.zIndex = panes[name];
  });
  map.getPane("outline").style.pointerEvents = "none";

  L.geoJSON(D.countries, {
    pane: "outline",
    renderer: L.svg({ pane: "outline", padding: 0.5 }),  // drawn well past the edges: no sea shows while panning or resizing
    interactive: false,
    style: { color: D.colors.border, weight: 0.8, fillColor: D.colors.land, fillOpacity: 1 },
  }).addTo(map);
  map.attributionControl.addAttribution(D.attribution);

  var tiles = L.tileLayer(D.tiles.url, { attribution: D.tiles.attribution, maxZoom: 19 });
  var status = document.createElement("div");
  status.className = "status";
  status.textContent = "base map: loading OpenStreetMap tiles\u2026";
  var loaded = 0, failed = 0;
  function showStatus() {
    status.textContent = loaded
      ? "base map: OpenStreetMap tiles"
      : "offline: OpenStreetMap tiles unavailable, drawn outline (Natural Earth 1:110m) and places shown";
  }
  tiles.on("tileload", function () { loaded += 1; showStatus(); });
  tiles.on("tileerror", function () { failed += 1; showStatus(); });
  tiles.addTo(map);

  var places = L.layerGroup();
  D.places.forEach(function (p) {
    var icon = L.divIcon({ className: "vidtag-place", html: "<i></i><span></span>", iconSize: null, iconAnchor: [3, 9] });
    var m = L.marker([p.lat, p.lon], { icon: icon, pane: "places", keyboard: false, title: p.tip });
    m.on("add", function () { m.getElement().querySelector("span").textContent = p.name; });
    places.addLayer(m);
  });
  places.addTo(map);

  var overlays = { "OpenStreetMap tiles": tiles, "place names": places };
  var legendRows = [];
  D.tracks.forEach(function (t) {
    var group = L.layerGroup();
    var dash = t.key === "phase1" ? "8 6" : null;
    var weight = t.key === "truth" ? 5 : t.key === "phase1" ? 3 : 4;
    if (t.key === "final") {
      // a dark halo so pale (unsure) colours still read over land and tiles
      group.addLayer(L.polyline(t.points, { pane: t.key, color: "#3a0000", weight: weight + 3, opacity: 0.55, interactive: false }));
    }
    if (t.colors) {
      for (var i = 1; i < t.points.length; i++) {
        group.addLayer(L.polyline([t.points[i - 1], t.points[i]], { pane: t.key, color: t.colors[i], weight: weight, opacity: 1 }));
      }
    } else {
      group.addLayer(L.polyline(t.points, { pane: t.key, color: t.color, weight: weight, dashArray: dash, opacity: 0.95 })
        .bindTooltip(t.label, { sticky: true }));
    }
    t.points.forEach(function (p, i) {
      var isStart = i === 0;
      if (t.key !== "final" && !isStart) return;
      group.addLayer(L.circleMarker(p, {
        pane: t.key, radius: isStart ? 6 : 4, weight: isStart ? 2.5 : 1,
        color: t.key === "final" && !isStart ? "#3a0000" : t.color,
        fillColor: isStart ? "#fff" : (t.colors ? t.colors[i] : t.color), fillOpacity: 1,
      }).bindTooltip((isStart ? "start: " : "") + t.tips[i]));
    });
    group.addTo(map);
    overlays[t.label] = group;
    var swatch = t.colors
      ? "<span class='ramp' style='background:linear-gradient(to right," + D.colors.confidence.join(",") + ")'></span>"
      : "<span class='swatch' style='border-top:" + weight + "px " + (dash ? "dashed" : "solid") + " " + t.color + "'></span>";
    legendRows.push("<div>" + swatch + (t.colors ? "final, by confidence (0 \u2192 1)" : t.label) + "</div>");
  });

  if (D.candidates) {
    var cands = L.layerGroup();
    var canvas = L.canvas({ pane: "candidates" });
    D.candidates.forEach(function (c) {
      cands.addLayer(L.circleMarker([c[0], c[1]], {
        pane: "candidates", renderer: canvas, radius: 3, weight: 1, color: "#444", fillColor: "#bbb", fillOpacity: 0.8,
      }).bindTooltip(c[2]));
    });
    overlays["candidates (top-K per frame)"] = cands;  // on demand: off until switched on
  }

  L.control.layers(null, overlays, { collapsed: false, position: "topright" }).addTo(map);
  L.control.scale({ position: "bottomleft" }).addTo(map);
  var legend = L.control({ position: "bottomright" });
  legend.onAdd = function () {
    var div = L.DomUtil.create("div", "vidtag-legend");
    div.innerHTML = "<b></b><div class='where'></div>" + legendRows.join("") + "<div>\u25cb start of each line</div>";
    div.querySelector("b").textContent = D.title || "trajectory";
    div.querySelector(".where").textContent = "near " + D.where;
    div.appendChild(status);
    return div;
  };
  legend.addTo(map);
  // no answer from the tile server within a few seconds counts as offline too
  setTimeout(function () { if (!loaded) showStatus(); }, 4000);
})();
