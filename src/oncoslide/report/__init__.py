"""Report figures: Kaplan-Meier curves of risk groups, metric heat maps, PNG encoding."""

from oncoslide.report.plots import figure_png_base64, heatmap_figure, km_figure, risk_groups

__all__ = ["figure_png_base64", "heatmap_figure", "km_figure", "risk_groups"]
