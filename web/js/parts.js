// Generated from training/charts/parts.py by scripts/update_generated_files.py: edit that table, not this file.
export const PARTS = {
  "unet": {
    "label": "UNet",
    "short_label": "UNet",
    "color": "#1f77b4",
    "color_on_dark": "#4e9eff",
    "dashed": false
  },
  "text_encoder": {
    "label": "TE",
    "short_label": "TE",
    "color": "#d62728",
    "color_on_dark": "#ff6b6b",
    "dashed": false
  },
  "text_encoder_2": {
    "label": "TE2 (SDXL)",
    "short_label": "TE2",
    "color": "#2ca02c",
    "color_on_dark": "#5fd068",
    "dashed": true
  }
};
export const PART_COLORS = Object.fromEntries(Object.entries(PARTS).map(([part, style]) => [part, style.color_on_dark]));
export const PART_LABELS = Object.fromEntries(Object.entries(PARTS).map(([part, style]) => [part, style.short_label]));
