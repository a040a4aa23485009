"""The loss curve as an image (PIL only, no matplotlib): raw loss in light blue, a moving average in dark blue."""

from __future__ import annotations

import PIL.Image
import PIL.ImageDraw


def loss_plot(losses: list[tuple[int, float]], width: int = 800, height: int = 480, smooth: int = 10
              ) -> PIL.Image.Image:
    """Plot ``[(step, loss), ...]``; a flat or one-point curve is drawn as a line in the middle."""
    margin_l, margin_b, margin_t, margin_r = 70, 40, 20, 20
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(image)
    x0, y0, x1, y1 = margin_l, margin_t, width - margin_r, height - margin_b
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=2)
    if not losses:
        draw.text((x0 + 10, y0 + 10), "no loss recorded yet", fill="black")
        return image
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    lo, hi = min(values), max(values)
    span = hi - lo or max(abs(hi), 1e-8)  # a flat curve: avoid dividing by zero
    s_lo, s_span = steps[0], (steps[-1] - steps[0]) or 1

    def point(step, value):
        x = x0 + (step - s_lo) / s_span * (x1 - x0)
        y = y1 - ((value - lo) / span if hi > lo else 0.5) * (y1 - y0)
        return (x, y)

    if len(values) > 1:
        draw.line([point(s, v) for s, v in losses], fill=(150, 190, 255), width=1)
        k = max(1, min(smooth, len(values) // 4 or 1))
        avg = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
        draw.line([point(s, v) for s, v in zip(steps, avg)], fill=(20, 60, 200), width=2)
    else:
        x, y = point(steps[0], values[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 200))
    draw.text((5, y0), f"{hi:.4g}", fill="black")
    draw.text((5, y1 - 12), f"{lo:.4g}", fill="black")
    draw.text((x0, y1 + 8), f"step {steps[0]}", fill="black")
    draw.text((x1 - 80, y1 + 8), f"step {steps[-1]}", fill="black")
    draw.text((width // 2 - 20, y1 + 20), "loss", fill="black")
    return image
