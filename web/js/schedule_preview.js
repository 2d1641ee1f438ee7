// LoRA Lab: live learning-rate curves inside the LR Schedule and UNet/TE Learning Rates nodes.
// The numbers come from POST /lora_lab/schedule_preview, computed by the same Python functions
// the trainer uses; this file only draws them. Redraws on every widget change, no queueing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PARTS, PART_COLORS, PART_LABELS } from "./parts.js";

const SCHEDULE_NODE = "LoRALabLRSchedule";
const RATES_NODE = "LoRALabLearningRates";
const CHART_HEIGHT = 170;

function widgetValues(node) {
  const values = {};
  for (const widget of node.widgets ?? []) {
    if (widget.name && widget.type !== "lora_lab_chart") values[widget.name] = widget.value;
  }
  return values;
}

// Links are read through the node API (isInputConnected / getInputNode / getOutputNodes), which
// every frontend has; the slot fields input.link / output.links are deprecated since frontend 1.5x.
function isNodeOf(node, type) {
  return node != null && (node.comfyClass === type || node.type === type);
}

function linkedScheduleNode(ratesNode) {
  const slot = ratesNode.inputs?.findIndex((input) => input.name === "lr_schedule") ?? -1;
  if (slot < 0 || !ratesNode.graph || !ratesNode.isInputConnected(slot)) return null;
  const origin = ratesNode.getInputNode(slot);
  return isNodeOf(origin, SCHEDULE_NODE) ? origin : null;
}

function linkedRatesNodes(scheduleNode) {
  if (!scheduleNode.graph) return [];
  const targets = (scheduleNode.outputs ?? []).flatMap((_, slot) => scheduleNode.getOutputNodes(slot) ?? []);
  return targets.filter((target) => isNodeOf(target, RATES_NODE));
}

// A cleared, device-pixel-sharp canvas of the given height: {context, width, height}.
export function clearCanvas(canvas, height, minimumWidth = 120, fallbackWidth = 300) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(minimumWidth, canvas.clientWidth || fallbackWidth);
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.fillStyle = "#1b1b1b";
  context.fillRect(0, 0, width, height);
  context.font = "11px sans-serif";
  return { context, width, height };
}

function drawChart(canvas, state) {
  const { context, width, height } = clearCanvas(canvas, CHART_HEIGHT);
  if (state.error) {
    context.fillStyle = "#ff8080";
    wrapText(context, state.error, 8, 18, width - 16, 14);
    return;
  }
  if (!state.series?.length) {
    context.fillStyle = "#aaa";
    context.fillText(state.message ?? "connect an LR Schedule to see the curves", 8, 18);
    return;
  }
  const left = 46, right = 8, top = 20, bottom = 22;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const steps = state.series[0].values.length;
  const maximum = Math.max(...state.series.flatMap((series) => series.values), 1e-12) * 1.05;
  const x = (step) => left + (plotWidth * step) / Math.max(1, steps - 1);
  const y = (value) => top + plotHeight * (1 - value / maximum);
  if (state.warmup > 0) {
    context.fillStyle = "rgba(255,179,71,0.25)";
    context.fillRect(left, top, x(state.warmup) - left, plotHeight);
  }
  context.strokeStyle = "#555";
  context.strokeRect(left, top, plotWidth, plotHeight);
  context.fillStyle = "#bbb";
  context.textAlign = "right";
  for (const fraction of [0, 0.5, 1]) {
    const value = maximum * fraction / 1.05;
    context.fillText(formatNumber(value), left - 4, y(value) + 4);
  }
  context.textAlign = "center";
  context.fillText("0", left, height - 6);
  context.fillText(`step ${steps}`, left + plotWidth - 20, height - 6);
  context.textAlign = "left";
  for (const series of state.series) {
    context.strokeStyle = series.color;
    context.lineWidth = 2;
    context.setLineDash(series.dashed ? [4, 3] : []);
    context.beginPath();
    series.values.forEach((value, step) => (step ? context.lineTo(x(step), y(value)) : context.moveTo(x(step), y(value))));
    context.stroke();
  }
  context.setLineDash([]);
  let legendX = left;
  for (const series of state.series) {
    context.fillStyle = series.color;
    context.fillText(series.label, legendX, 13);
    legendX += context.measureText(series.label).width + 12;
  }
  if (state.note) {
    context.fillStyle = "#ffb347";
    wrapText(context, state.note, left + 4, top + 14, plotWidth - 8, 13);
  }
}

export function wrapText(context, text, x, y, maxWidth, lineHeight) {
  let line = "";
  for (const word of String(text).split(" ")) {
    const candidate = line ? `${line} ${word}` : word;
    if (context.measureText(candidate).width > maxWidth && line) {
      context.fillText(line, x, y);
      y += lineHeight;
      line = word;
    } else line = candidate;
  }
  context.fillText(line, x, y);
}

export function formatNumber(value) {
  if (value === 0) return "0";
  return Math.abs(value) >= 0.01 ? value.toFixed(2) : value.toExponential(1);
}

async function fetchPreview(body) {
  const response = await api.fetchApi("/lora_lab/schedule_preview", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error ?? `HTTP ${response.status}`);
  return answer;
}

// A canvas inside the node (a DOM widget of type "lora_lab_chart") that is not a value.
export function addChartWidget(node, name, height) {
  const canvas = document.createElement("canvas");
  canvas.style.width = "100%";
  canvas.style.height = `${height}px`;
  const widget = node.addDOMWidget(name, "lora_lab_chart", canvas, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height + 6,
    getHeight: () => height + 6,
  });
  // Not a value: keep it out of saved workflows (widgets_values) and of the prompt.
  widget.serialize = false;
  widget.serializeValue = () => undefined;
  return canvas;
}

function addChart(node) {
  const canvas = addChartWidget(node, "lr_chart", CHART_HEIGHT);
  canvas.dataset.loraLabChart = node.comfyClass ?? node.type;
  node.loraLabCanvas = canvas;
  node.loraLabState = { message: "loading..." };
  drawChart(canvas, node.loraLabState);
}

let requestCounter = 0;
async function refresh(node) {
  if (!node.loraLabCanvas) return;
  const ticket = (node.loraLabTicket = ++requestCounter);
  let state;
  try {
    if ((node.comfyClass ?? node.type) === SCHEDULE_NODE) {
      const values = widgetValues(node);
      const answer = await fetchPreview({ ...values, total_steps: values.preview_steps });
      state = {
        series: [{ values: answer.multipliers, color: "#4e9eff", label: "x base rate" }],
        warmup: answer.warmup_steps,
        note: answer.note,
      };
    } else {
      const scheduleNode = linkedScheduleNode(node);
      if (!scheduleNode) {
        state = { message: "connect an LR Schedule to see the rate per part" };
      } else {
        const scheduleValues = widgetValues(scheduleNode);
        const answer = await fetchPreview({ ...scheduleValues, total_steps: scheduleValues.preview_steps, rates: widgetValues(node) });
        const series = [];
        for (const [part, values] of Object.entries(answer.parts ?? {})) {
          // TE2 usually equals TE (it inherits it): dashed, so both stay visible.
          series.push({ values, color: PART_COLORS[part], label: PART_LABELS[part], dashed: Boolean(PARTS[part]?.dashed) });
          if (answer.lora_plus_ratio !== 1) {
            series.push({ values: values.map((value) => value * answer.lora_plus_ratio), color: PART_COLORS[part],
                          dashed: true, label: `${PART_LABELS[part]} B x${answer.lora_plus_ratio}` });
          }
        }
        state = series.length ? { series, warmup: answer.warmup_steps } : { message: "nothing is trained: every rate is 0" };
      }
    }
  } catch (error) {
    state = { error: error.message };
  }
  if (ticket !== node.loraLabTicket) return; // a newer request superseded this one
  node.loraLabState = state;
  drawChart(node.loraLabCanvas, state);
  node.setDirtyCanvas?.(true, true);
}

function scheduleRefresh(node) {
  clearTimeout(node.loraLabTimer);
  node.loraLabTimer = setTimeout(() => {
    refresh(node);
    if ((node.comfyClass ?? node.type) === SCHEDULE_NODE) linkedRatesNodes(node).forEach((target) => refresh(target));
  }, 60);
}

function watchWidgets(node) {
  for (const widget of node.widgets ?? []) {
    if (widget.type === "lora_lab_chart" || widget.loraLabWatched) continue;
    const original = widget.callback;
    widget.callback = function (...args) {
      const result = original?.apply(this, args);
      scheduleRefresh(node);
      return result;
    };
    widget.loraLabWatched = true;
  }
}

app.registerExtension({
  name: "LoRALab.SchedulePreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SCHEDULE_NODE && nodeData.name !== RATES_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addChart(this);
      watchWidgets(this);
      scheduleRefresh(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      watchWidgets(this);
      scheduleRefresh(this); // saved workflows: draw with the loaded values
      return result;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      scheduleRefresh(this);
      return result;
    };
  },
});

// Exposed for tests and other LoRA Lab scripts (browser tests read the drawn state).
window.loraLabSchedulePreview = { refresh, drawChart };
