"""Report figures: Kaplan-Meier curves of risk groups, ROC curves and reliability diagrams of
classifiers, metric heat maps, PNG encoding."""

from oncoslide.report.plots import (
    Calibration,
    ClassifierCurves,
    RocCurve,
    calibration_bins,
    classification_figure,
    figure_png_base64,
    heatmap_figure,
    km_figure,
    mean_roc_curve,
    risk_groups,
)

__all__ = [
    "Calibration",
    "ClassifierCurves",
    "RocCurve",
    "calibration_bins",
    "classification_figure",
    "figure_png_base64",
    "heatmap_figure",
    "km_figure",
    "mean_roc_curve",
    "risk_groups",
]
