// LoRA Lab: live training chart inside the Train LoRA node.
// The trainer sends one websocket event per optimizer step, `lora_lab.train_progress`
// {node, step, total, loss, lr: {part: rate}, val_loss, effective_lr} (nodes/comfy/feedback.py
// progress_reporter), with the rate each part actually got from the optimizer and, from an adaptive
// optimizer (Prodigy), the step it really took per part (effective_lr: d x lr, else null). This file keeps
// those records per node and draws loss (raw and smoothed) and the rate of every trained part; effective
// rates dash-dot beside the set ones, on a log rate axis (Prodigy's set rate is near 1, its step far below).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PART_COLORS, PART_LABELS } from "./parts.js";
import { addChartWidget, clearCanvas, formatNumber, wrapText } from "./schedule_preview.js";

const CHART_NODES = ["LoRALabTrain", "LoRALabLRFinder"];   // the finder's sweep sends the same events
const VAL_LOSS_COLOR = "#e377c2";
const EVENT = "lora_lab.train_progress";
const CHART_HEIGHT = 200;
const SMOOTHING = 0.9; // exponential moving average of the loss, debiased as in TensorBoard
const EFFECTIVE_DASH = [5, 2, 1, 2];

function smoothed(values) {
  let average = 0;
  return values.map((value, index) => {
    average = SMOOTHING * average + (1 - SMOOTHING) * value;
    return average / (1 - SMOOTHING ** (index + 1));
  });
}

function drawTraining(canvas, state) {
  const { context, width, height } = clearCanvas(canvas, CHART_HEIGHT, 160, 360);
  const records = state.records;
  if (!records.length) {
    context.fillStyle = "#aaa";
    wrapText(context, state.message, 8, 18, width - 16, 14);
    return;
  }
  const last = records[records.length - 1];
  const left = 46, right = 54, top = 46, bottom = 20;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const total = Math.max(state.total, last.step + 1);
  const x = (step) => left + (plotWidth * step) / Math.max(1, total - 1);
  const losses = records.flatMap((record) => [record.loss, record.val_loss]).filter(Number.isFinite);
  const lossLow = Math.min(...losses, 0), lossHigh = Math.max(...losses, 1e-12) * 1.05;
  const lossY = (value) => top + plotHeight * (1 - (value - lossLow) / (lossHigh - lossLow || 1));
  const parts = Object.keys(last.lr ?? {});
  const effectiveParts = [...new Set(records.flatMap((record) => Object.keys(record.effective_lr ?? {})))];
  const allRates = records.flatMap((record) => [...Object.values(record.lr ?? {}), ...Object.values(record.effective_lr ?? {})]);
  const rateHigh = Math.max(...allRates, 1e-12) * 1.05;
  const logScale = effectiveParts.length > 0;
  const rateLow = logScale ? Math.min(...allRates.filter((value) => value > 0), rateHigh / 10) : 0;
  const rateY = logScale
    ? (value) => top + plotHeight * (1 - (value > 0 ? Math.max(0, Math.log(value / rateLow) / Math.log(rateHigh / rateLow)) : 0))
    : (value) => top + plotHeight * (1 - value / rateHigh);

  context.strokeStyle = "#555";
  context.strokeRect(left, top, plotWidth, plotHeight);
  context.fillStyle = "#bbb";
  context.textAlign = "right";
  for (const fraction of [0, 1]) {
    const value = lossLow + (lossHigh - lossLow) * fraction / 1.05;
    context.fillText(formatNumber(value), left - 4, lossY(value) + 4);
  }
  context.textAlign = "left";
  for (const value of logScale ? [rateLow, rateHigh / 1.05] : [0, rateHigh / 1.05]) {
    context.fillText(formatNumber(value), left + plotWidth + 4, rateY(value) + 4);
  }
  context.textAlign = "center";
  context.fillText("loss", left - 22, top - 6);
  context.fillText(logScale ? "rate (log)" : "rate", left + plotWidth + 24, top - 6);
  context.fillText(`step ${total}`, left + plotWidth - 20, height - 5);
  context.fillText("0", left, height - 5);

  const line = (points, color, widthPx, dash = []) => {
    context.strokeStyle = color;
    context.lineWidth = widthPx;
    context.setLineDash(dash);
    context.beginPath();
    points.forEach(([px, py], index) => (index ? context.lineTo(px, py) : context.moveTo(px, py)));
    context.stroke();
    context.setLineDash([]);
  };
  line(records.map((record) => [x(record.step), lossY(record.loss)]), "#777", 1);
  const average = smoothed(records.map((record) => record.loss));
  line(records.map((record, index) => [x(record.step), lossY(average[index])]), "#f0f0f0", 2);
  for (const part of parts) {
    line(records.map((record) => [x(record.step), rateY(record.lr?.[part] ?? 0)]), PART_COLORS[part] ?? "#ffb347", 1.5);
  }
  for (const part of effectiveParts) {
    const stepped = records.filter((record) => Number.isFinite(record.effective_lr?.[part]));
    line(stepped.map((record) => [x(record.step), rateY(record.effective_lr[part])]), PART_COLORS[part] ?? "#ffb347", 2,
         EFFECTIVE_DASH);
  }
  const validated = records.filter((record) => Number.isFinite(record.val_loss));
  if (validated.length) {
    line(validated.map((record) => [x(record.step), lossY(record.val_loss)]), VAL_LOSS_COLOR, 1.5);
    context.fillStyle = VAL_LOSS_COLOR;
    for (const record of validated) context.fillRect(x(record.step) - 2, lossY(record.val_loss) - 2, 4, 4);
  }

  context.textAlign = "left";
  context.fillStyle = "#ddd";
  const rates = parts.map((part) => `${PART_LABELS[part] ?? part} ${formatNumber(last.lr[part])}` +
    (Number.isFinite(last.effective_lr?.[part]) ? ` (d·lr ${formatNumber(last.effective_lr[part])})` : "")).join("  ");
  context.fillText(`step ${last.step + 1}/${total}  loss ${last.loss.toFixed(4)} (avg ${average[average.length - 1].toFixed(4)})`, 8, 13);
  let legendX = 8;
  const legend = validated.length ? [["loss", "#f0f0f0"], ["val", VAL_LOSS_COLOR]] : [["loss", "#f0f0f0"]];
  for (const [label, color] of [...legend, ...parts.map((part) => [PART_LABELS[part] ?? part, PART_COLORS[part] ?? "#ffb347"])]) {
    context.fillStyle = color;
    context.fillText(label, legendX, 27);
    legendX += context.measureText(label).width + 10;
  }
  context.fillStyle = "#999";
  context.fillText(rates, legendX + 6, 27);
}

function addTrainingChart(node) {
  const canvas = addChartWidget(node, "training_chart", CHART_HEIGHT);
  canvas.dataset.loraLabTrainingChart = "1";
  node.loraLabTrainingCanvas = canvas;
  // State for tests and curious users: every record since the run started, and how many events arrived.
  node.loraLabTraining = { records: [], total: 0, updates: 0, message: "Queue the graph: loss and learning rate per part appear here, step by step." };
  drawTraining(canvas, node.loraLabTraining);
}

function onProgress({ detail }) {
  const node = detail?.node != null ? app.graph?.getNodeById(detail.node) : null;
  if (!node?.loraLabTraining) return; // another tab's graph, or a node inside a subgraph
  const state = node.loraLabTraining;
  const previous = state.records[state.records.length - 1];
  if (detail.step === 0 || (previous && detail.step <= previous.step)) state.records = []; // a new run
  state.records.push({ step: detail.step, loss: detail.loss, lr: detail.lr ?? {}, val_loss: detail.val_loss ?? null,
                      effective_lr: detail.effective_lr ?? null });
  state.total = detail.total;
  state.updates += 1;
  if (!state.pending) {
    state.pending = true;
    requestAnimationFrame(() => {
      state.pending = false;
      drawTraining(node.loraLabTrainingCanvas, state);
      node.setDirtyCanvas?.(true, true);
    });
  }
}

app.registerExtension({
  name: "LoRALab.TrainingChart",
  setup() {
    api.addEventListener(EVENT, onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!CHART_NODES.includes(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addTrainingChart(this);
      return result;
    };
  },
});

window.loraLabTrainingChart = { drawTraining };
