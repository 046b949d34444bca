"""SynthFER's generator: expressions, ambiguous labels and cartoon faces, from a seed.

NumPy and OpenCV only (no TFDS), so that it can be used and tested on its own. The dataset
built from it, and what it is for, is described in `synthfer.py`.

One sample is made by one `np.random.Generator` seeded with (seed, split, index), so sample
i does not depend on how many samples are made. Its draws come in a fixed order and number
(expression, annotation, look, finish), so the labels can be had without rendering, and a
change to one stage does not reshuffle the others.

Expression: a primary class, uniform over the 7 classes, with a second class blended in with
probability BLEND_PROB; train labels are drawn from the true distribution, test labels are the
true label (`_sample_expression`). Drawing: in face units on a canvas twice the output size,
reduced for anti-aliasing; then pose, background, lighting, blur and sensor noise at the
output size (`_draw_face`, `_finish`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
from typing import Callable, Iterator

import cv2
import numpy as np

CLASS_NAMES = ('Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral')
NUM_CLASSES = len(CLASS_NAMES)
NEUTRAL = CLASS_NAMES.index('Neutral')
IMAGE_SIZE = 112
BLEND_PROB = 0.3
BLEND_WEIGHT = (0.2, 0.5)
INTENSITY = (0.7, 1.0)
SPLIT_IDS = {'train': 0, 'test': 1}

PARAMS = ('brow_raise', 'brow_tilt', 'eye_open', 'cheek_raise', 'nose_wrinkle',
          'mouth_curve', 'mouth_open', 'mouth_width', 'lip_raise')
# One row per class at full intensity. Signs: brow_tilt > 0 lowers the inner brow ends
# (anger), < 0 raises them (sadness, fear); mouth_curve > 0 lifts the corners.
PROTOTYPES = np.array([
    # raise  tilt   eye  cheek  nose  curve  open  width   lip
    [1.00,  0.00, 1.00,  0.00, 0.00,  0.00, 0.85, -0.70, 0.00],  # Surprise
    [0.60, -0.80, 0.95,  0.00, 0.00, -0.35, 0.40,  0.90, 0.10],  # Fear
    [-0.45, 0.40, 0.30,  0.20, 1.00, -0.70, 0.12,  0.00, 1.00],  # Disgust
    [0.10,  0.00, 0.35,  1.00, 0.00,  1.00, 0.35,  0.70, 0.00],  # Happiness
    [0.05, -1.00, 0.35,  0.00, 0.00, -0.95, 0.00, -0.10, 0.00],  # Sadness
    [-0.95, 1.00, 0.65,  0.00, 0.35, -0.35, 0.00, -0.40, 0.20],  # Anger
    [0.00,  0.00, 0.55,  0.00, 0.00,  0.00, 0.00,  0.00, 0.00],  # Neutral
])
# Person-to-person spread of each parameter (resting faces differ).
PARAM_JITTER = np.array([0.12, 0.12, 0.06, 0.08, 0.08, 0.10, 0.05, 0.12, 0.08])
PARAM_LOW = np.array([-1.2, -1.2, 0.05, 0.0, 0.0, -1.2, 0.0, -1.2, 0.0])
PARAM_HIGH = np.array([1.2, 1.2, 1.1, 1.1, 1.1, 1.2, 1.1, 1.2, 1.1])


# ----------------------------------------------------------------------------------------
# Sampling.


@dataclasses.dataclass(frozen=True)
class Labels:
  """What is known about one sample's expression.

  Attributes:
    distribution: float32 [7], the true label distribution (the mixing weights).
    true_label: the primary class (the argmax of `distribution`).
    label: the annotated label: a draw from `distribution` (train) or `true_label` (test).
    blended: whether a second class was mixed in.
  """
  distribution: np.ndarray
  true_label: int
  label: int
  blended: bool


def _generator(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _scale(u, lo, hi):
  return lo + (hi - lo) * u


def _sample_expression(rng: np.random.Generator, split: str) -> tuple[Labels, np.ndarray]:
  """Labels and face parameters; always the same number of draws.

  A primary class, uniform over the 7 classes; with probability BLEND_PROB a second class is
  mixed in with weight w ~ U(BLEND_WEIGHT). The true distribution is the mixing weights (one-hot
  when not blended) and `true_label` is the primary class. The face parameters are the
  distribution-weighted mix of the class prototypes, scaled from neutral by an intensity
  ~ U(INTENSITY), plus per-person jitter. Train labels are drawn from the true distribution (a
  blended sample gets its second class with probability w); test labels are the true label.
  """
  u = rng.random(6)
  jitter = rng.standard_normal(len(PARAMS))
  primary = int(u[0] * NUM_CLASSES)
  dist = np.zeros(NUM_CLASSES)
  dist[primary] = 1.0
  blended = bool(u[1] < BLEND_PROB)
  if blended:
    secondary = (primary + 1 + int(u[2] * (NUM_CLASSES - 1))) % NUM_CLASSES
    w = _scale(u[3], *BLEND_WEIGHT)
    dist[primary], dist[secondary] = 1.0 - w, w
  if split == 'test':
    label = primary
  else:  # the first class whose cumulative probability exceeds a uniform draw
    label = int(min(np.searchsorted(np.cumsum(dist), u[5], side='right'), NUM_CLASSES - 1))
  neutral = PROTOTYPES[NEUTRAL]
  params = neutral + _scale(u[4], *INTENSITY) * (dist @ PROTOTYPES - neutral)
  params = np.clip(params + jitter * PARAM_JITTER, PARAM_LOW, PARAM_HIGH)
  labels = Labels(distribution=dist.astype(np.float32), true_label=primary, label=label,
                  blended=blended)
  return labels, params


def sample_labels(seed: int, split: str, index: int) -> Labels:
  """The labels of sample `index` of `split`, without rendering it."""
  return _sample_expression(_generator(seed, split, index), split)[0]


# ----------------------------------------------------------------------------------------
# Drawing primitives.

_SS = 2                      # supersampling factor
_SHIFT = 4                   # fractional bits of OpenCV's fixed-point coordinates
_ORIGIN = np.array([56.0, 60.0])  # the face centre in the 112-pixel frame
_CANVAS = IMAGE_SIZE * _SS
_AA = cv2.LINE_AA
_TO_FIXED = _SS * (1 << _SHIFT)


def _fixed(pts) -> np.ndarray:
  """Face units -> OpenCV fixed-point pixel coordinates, shaped [N, 1, 2]."""
  p = (np.asarray(pts, np.float64).reshape(-1, 2) + _ORIGIN) * _TO_FIXED + 0.5
  return p.astype(np.int32).reshape(-1, 1, 2)  # rounds: the coordinates are positive


# The canvas is RGBA and everything is drawn opaque, so the alpha channel ends up as the
# silhouette of the head, which puts it on the background.


def _fill(img, pts, color) -> None:
  cv2.fillPoly(img, [_fixed(pts)], (*color, 255), _AA, _SHIFT)


def _stroke(img, pts, color, width: float) -> None:
  cv2.polylines(img, [_fixed(pts)], False, (*color, 255), max(1, int(round(width * _SS))),
                _AA, _SHIFT)


@functools.lru_cache(maxsize=None)
def _arc(n: int, t0: float, t1: float) -> np.ndarray:
  """[n, 2] (cos t, sin t) on [t0, t1]; cached, since the same arcs are drawn every time."""
  t = np.linspace(t0, t1, n, endpoint=t1 - t0 < 2 * math.pi - 1e-9)
  return np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse(center, a: float, b: float, n: int = 28, t0: float = 0.0,
             t1: float = 2 * math.pi) -> np.ndarray:
  return _arc(n, t0, t1) * (a, b) + center


@functools.lru_cache(maxsize=None)
def _bezier_basis(n: int) -> np.ndarray:
  """[n, 3] weights of (p0, mid, p2) for the quadratic Bezier through mid at t = 1/2."""
  t = np.linspace(0.0, 1.0, n)
  b0, b1, b2 = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
  # With control point c = 2 mid - (p0 + p2) / 2 the curve passes through mid halfway.
  return np.stack([b0 - 0.5 * b1, 2.0 * b1, b2 - 0.5 * b1], axis=1)


def _curve(p0, mid, p2, n: int = 12) -> np.ndarray:
  """Quadratic Bezier from p0 to p2 passing through `mid` halfway."""
  return _bezier_basis(n) @ np.array([p0, mid, p2], np.float64)


def _band(spine: np.ndarray, width0: float, width1: float) -> np.ndarray:
  """A polygon of tapering width around a polyline (for brows)."""
  d = np.empty_like(spine)
  d[1:-1] = spine[2:] - spine[:-2]
  d[0], d[-1] = spine[1] - spine[0], spine[-1] - spine[-2]
  normal = d[:, ::-1] * (-1.0, 1.0)
  normal /= np.sqrt((normal ** 2).sum(axis=1, keepdims=True)) + 1e-9
  half = np.linspace(width0, width1, len(spine))[:, None] / 2
  return np.concatenate([spine + half * normal, (spine - half * normal)[::-1]])


def _mix(c0, c1, t: float) -> tuple:
  return tuple(a + (b - a) * t for a, b in zip(c0, c1))


def _shade(color, factor: float) -> tuple:
  return tuple(min(255.0, c * factor) for c in color)


def _paint_clipped(img: np.ndarray, clip_pts, draw: Callable[[np.ndarray], None],
                   reach: float = 5.0) -> None:
  """Runs `draw` on img but keeps what it draws inside polygon clip_pts only.

  Irises and teeth must not spill over the eyelids and lips. Only the clip polygon's
  bounding box, grown by `reach` face units (how far `draw` may go past the polygon), is
  saved and blended back, which keeps this cheap.
  """
  fixed = _fixed(clip_pts)
  pad = int(math.ceil(reach * _SS))
  lo = np.maximum((fixed.min(axis=(0, 1)) >> _SHIFT) - pad, 0)
  hi = np.minimum((fixed.max(axis=(0, 1)) >> _SHIFT) + pad + 2, _CANVAS)
  roi = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
  before = img[roi].astype(np.float32)
  draw(img)
  alpha = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
  cv2.fillPoly(alpha, [fixed - (lo << _SHIFT)], 255, _AA, _SHIFT)
  a = alpha[..., None].astype(np.float32) * np.float32(1 / 255)
  img[roi] = (before + (img[roi] - before) * a).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Appearance.

_SKIN_TONES = np.array([(245, 214, 190), (232, 190, 160), (205, 152, 115), (160, 110, 75),
                        (105, 70, 48)], np.float64)
_HAIR_COLOURS = np.array([(25, 20, 18), (62, 42, 28), (112, 78, 45), (196, 160, 100),
                          (150, 70, 35), (175, 172, 168)], np.float64)
_HAIR_CDF = np.cumsum([0.3, 0.3, 0.15, 0.1, 0.07, 0.08])
_HAIR_STYLE_CDF = np.cumsum([0.12, 0.5, 0.38])  # bald, short, long
_IRIS_COLOURS = np.array([(70, 45, 25), (40, 28, 20), (70, 110, 150), (80, 110, 70)],
                         np.float64)
# Uniform ranges of the look's geometry, in face units (the face is ~64 x 84 units).
_LOOK_RANGES = {
    'hairline': (0.6, 0.75),   # fraction of the face half-height above the centre
    'parting': (-8.0, 8.0),
    'face_a': (29.0, 35.0),    # face half-width
    'face_b': (38.0, 44.0),    # face half-height
    'jaw': (0.7, 0.92),        # how much the lower face narrows (1 = an ellipse)
    'eye_dx': (12.5, 15.0),
    'eye_y': (-8.0, -4.5),
    'eye_w': (5.5, 6.8),
    'eye_h': (3.8, 4.6),
    'iris_r': (2.3, 2.9),
    'gaze_x': (-1.0, 1.0),
    'gaze_y': (-0.4, 0.4),
    'brow_gap': (7.0, 8.5),
    'brow_th': (1.8, 2.8),
    'nose_len': (12.0, 15.0),
    'nose_w': (4.0, 5.5),
    'mouth_gap': (8.0, 10.5),  # from the nose tip down to the mouth
    'mouth_w': (11.0, 14.0),
    'lip_tint': (0.25, 0.55),
    'yaw': (-1.0, 1.0),        # features shift sideways when the head turns
}


@dataclasses.dataclass(frozen=True)
class Look:
  """Everything about a face that is not its expression (face units, RGB colours)."""
  skin: tuple
  hair: tuple
  hair_style: int
  shirt: tuple
  iris: tuple
  lip: tuple
  hairline: float
  parting: float
  face_a: float
  face_b: float
  jaw: float
  eye_dx: float
  eye_y: float
  eye_w: float
  eye_h: float
  iris_r: float
  gaze_x: float
  gaze_y: float
  brow_gap: float
  brow_th: float
  nose_len: float
  nose_w: float
  mouth_gap: float
  mouth_w: float
  lip_tint: float
  yaw: float


def _sample_look(rng: np.random.Generator) -> Look:
  u = rng.random(len(_LOOK_RANGES) + 8)
  n = rng.standard_normal(9)
  geometry = {k: float(_scale(x, *r)) for (k, r), x in zip(_LOOK_RANGES.items(), u)}
  c = u[len(_LOOK_RANGES):]
  t = c[0] * (len(_SKIN_TONES) - 1)
  i = min(int(t), len(_SKIN_TONES) - 2)
  skin = _SKIN_TONES[i] + (t - i) * (_SKIN_TONES[i + 1] - _SKIN_TONES[i])
  skin = np.clip(skin + 6 * n[:3], 30, 255)
  hair = _HAIR_COLOURS[min(np.searchsorted(_HAIR_CDF, c[1]), len(_HAIR_COLOURS) - 1)]
  hair = np.clip(hair + 8 * n[3:6], 5, 250)
  iris = _IRIS_COLOURS[int(c[2] * len(_IRIS_COLOURS))] + 8 * n[6:9]
  return Look(
      skin=tuple(skin), hair=tuple(hair),
      hair_style=int(min(np.searchsorted(_HAIR_STYLE_CDF, c[3]), 2)),
      shirt=tuple(_scale(c[4:7], 20, 235)), iris=tuple(iris),
      lip=_mix(skin, (175, 60, 70), geometry['lip_tint']), **geometry)


# ----------------------------------------------------------------------------------------
# The face, part by part. `p` maps PARAMS to their values.


def _draw_head(img, lk: Look) -> None:
  """Hair behind, shoulders, neck, ears and the face shape."""
  a, b = lk.face_a, lk.face_b
  if lk.hair_style == 2:
    top = _ellipse((0, -2), a * 1.18, b * 1.12, t0=math.pi, t1=2 * math.pi, n=20)
    _fill(img, np.concatenate([top, [(a * 1.25, b * 0.9), (-a * 1.25, b * 0.9)]]), lk.hair)
  _fill(img, _ellipse((0, b + 40), a * 2.3, 26), lk.shirt)
  _fill(img, [(-a * 0.45, b * 0.3), (a * 0.45, b * 0.3), (a * 0.5, b + 20),
              (-a * 0.5, b + 20)], _shade(lk.skin, 0.82))
  for s in (-1, 1):
    ear = (s * (a - 1.0) - 0.8 * lk.yaw * s, lk.eye_y + 5)
    _fill(img, _ellipse(ear, 4.5, 8.0, n=16), _shade(lk.skin, 0.92))
    _fill(img, _ellipse((ear[0] + s * 0.8, ear[1]), 2.2, 5.0, n=12), _shade(lk.skin, 0.75))
  upper = _ellipse((0, 0), a, b * 0.97, t0=math.pi, t1=2 * math.pi, n=20)
  cos_sin = _arc(20, 0.0, math.pi)
  lower = cos_sin * (a, b)
  lower[:, 0] *= 1 - (1 - lk.jaw) * cos_sin[:, 1]
  _fill(img, np.concatenate([upper, lower]), lk.skin)


def _draw_fringe(img, lk: Look) -> None:
  if lk.hair_style == 0:
    return
  a, b = lk.face_a, lk.face_b
  arc = _ellipse((0, -1), a * 1.06, b * 1.07, t0=math.pi + 0.25, t1=2 * math.pi - 0.25, n=20)
  line = _curve(arc[-1], (lk.parting, -b * lk.hairline), arc[0], n=14)
  _fill(img, np.concatenate([arc, line[1:-1]]), lk.hair)


def _draw_eyes(img, lk: Look, p: dict) -> None:
  dx = 2.5 * lk.yaw
  cheek = min(p['cheek_raise'], 1.0)
  upper_h = lk.eye_h * (0.15 + 1.1 * p['eye_open'])
  lower_h = upper_h * (0.8 - 0.55 * cheek)  # a raised cheek pushes the lower lid up
  for s in (-1, 1):
    cx, cy = s * lk.eye_dx + dx, lk.eye_y
    top = _ellipse((cx, cy), lk.eye_w, upper_h, t0=math.pi, t1=2 * math.pi, n=14)
    bottom = _ellipse((cx, cy), lk.eye_w, lower_h, t0=0, t1=math.pi, n=14)
    outline = np.concatenate([top, bottom])
    _fill(img, outline, (238, 236, 230))
    centre = (cx + lk.gaze_x, cy + lk.gaze_y)

    def iris(canvas, centre=centre):
      r = lk.iris_r
      _fill(canvas, _ellipse(centre, r, r, n=16), lk.iris)
      _fill(canvas, _ellipse(centre, r * 0.45, r * 0.45, n=10), (15, 12, 12))
      _fill(canvas, _ellipse((centre[0] + 0.8, centre[1] - 0.8), 0.55, 0.55, n=8),
            (250, 250, 250))

    _paint_clipped(img, outline, iris)
    _stroke(img, top, (30, 22, 20), 0.9)  # lash line
    _stroke(img, bottom, _shade(lk.skin, 0.75), 0.5)
    crease = _ellipse((cx, cy - 0.8), lk.eye_w * 1.05, upper_h + 2.2, t0=math.pi * 1.15,
                      t1=math.pi * 1.85, n=10)
    _stroke(img, crease, _shade(lk.skin, 0.8), 0.5)
    if cheek > 0.15:  # the bulge of a raised cheek under the eye
      bulge = _ellipse((cx, cy + lower_h + 0.8), lk.eye_w * 0.8, 1.8, t0=0.2,
                       t1=math.pi - 0.2, n=10)
      _stroke(img, bulge, _mix(lk.skin, _shade(lk.skin, 0.55), 0.35 * cheek), 0.6)


def _draw_brows(img, lk: Look, p: dict) -> None:
  dx = 2.5 * lk.yaw
  raise_, tilt = p['brow_raise'], p['brow_tilt']
  base = lk.eye_y - lk.brow_gap - 4.2 * raise_
  colour = _mix(lk.hair, (20, 15, 12), 0.3)
  for s in (-1, 1):
    inner = (s * (lk.eye_dx - lk.eye_w) + dx, base + 3.5 * tilt)
    mid = (s * (lk.eye_dx + 0.5) + dx, base - 1.3 - 1.0 * max(raise_, 0.0) + 0.3 * tilt)
    outer = (s * (lk.eye_dx + lk.eye_w + 2.5) + dx, base + 1.0 - 0.5 * tilt)
    _fill(img, _band(_curve(inner, mid, outer, n=10), lk.brow_th, lk.brow_th * 0.45), colour)
  line = _shade(lk.skin, 0.6)
  if raise_ > 0.35:  # forehead wrinkles of raised brows
    shade = _mix(lk.skin, line, min((raise_ - 0.35) / 0.65, 1.0) * 0.7)
    for j in range(2):
      y = base - 4.5 - 3.0 * j
      _stroke(img, _curve((-11 + dx, y + 1), (dx, y - 0.5), (11 + dx, y + 1), n=10), shade,
              0.5)
  if tilt > 0.3:  # vertical frown lines between lowered brows
    shade = _mix(lk.skin, line, min((tilt - 0.3) / 0.7, 1.0))
    for s in (-1, 1):
      x = s * 1.8 + dx
      _stroke(img, [(x, lk.eye_y - 2.5), (x + s * 0.4, base + 2.0)], shade, 0.7)


def _nose_tip_y(lk: Look, p: dict) -> float:
  return lk.eye_y + lk.nose_len - 1.5 * p['nose_wrinkle']  # wrinkling pulls the tip up


def _draw_nose(img, lk: Look, p: dict) -> None:
  """The nose, its wrinkles, and the folds from the nose to the mouth corners."""
  dx = 3.5 * lk.yaw
  wrinkle = p['nose_wrinkle']
  tip = _nose_tip_y(lk, p)
  w = lk.nose_w + 1.0 * wrinkle
  dark = _shade(lk.skin, 0.6)
  _stroke(img, _curve((-w + dx, tip - 1), (dx, tip + 1.5), (w + dx, tip - 1), n=10),
          _shade(lk.skin, 0.78), 0.7)
  for s in (-1, 1):
    _fill(img, _ellipse((s * w * 0.5 + dx, tip), 1.3, 0.7, n=10), _shade(lk.skin, 0.45))
  side = 1 if lk.yaw < 0 else -1  # the shaded side of the bridge
  _stroke(img, [(side * 2.0 + dx * 0.6, lk.eye_y + 2), (side * w * 0.8 + dx, tip - 2.5)],
          _shade(lk.skin, 0.88), 0.6)
  if wrinkle > 0.2:
    shade = _mix(lk.skin, dark, min((wrinkle - 0.2) / 0.8, 1.0) * 0.9)
    for j in range(3):
      y = lk.eye_y + 2.0 + 1.6 * j
      _stroke(img, _curve((-3.2 + dx, y + 0.6), (dx, y - 0.3), (3.2 + dx, y + 0.6), n=6),
              shade, 0.7)
  mouth_y = tip + lk.mouth_gap
  fold = min(0.15 + 0.6 * p['cheek_raise'] + 0.5 * p['lip_raise'], 1.0)
  for s in (-1, 1):
    start = (s * (w + 1.8) + dx, tip - 1.5)
    end = (s * (lk.mouth_w + 3.0) + dx * 0.8, mouth_y + 2.5)
    mid = (s * (w + 3.5 + 1.5 * p['cheek_raise']) + dx, 0.5 * (tip + mouth_y))
    _stroke(img, _curve(start, mid, end, n=10), _mix(lk.skin, dark, 0.5 * fold), 0.6)


def _draw_cheeks(img, lk: Look, p: dict, mouth_y: float) -> None:
  cheek = p['cheek_raise']
  colour = _mix(lk.skin, (225, 105, 105), 0.06 + 0.14 * min(cheek, 1.0))
  for s in (-1, 1):
    _fill(img, _ellipse((s * (lk.eye_dx + 2) + 2.5 * lk.yaw, mouth_y - 9 - 3 * cheek), 5.5,
                        4.0, n=16), colour)


def _draw_mouth(img, lk: Look, p: dict, mouth_y: float) -> None:
  dx = 3.0 * lk.yaw
  curve, opening, lip = p['mouth_curve'], p['mouth_open'], p['lip_raise']
  half = lk.mouth_w * (1 + 0.22 * p['mouth_width'] + 0.1 * max(curve, 0.0))
  gap = 10.0 * opening
  corner_y = mouth_y - 6.0 * curve
  # Disgust raises one side of the upper lip more than the other.
  left = np.array([-half + dx, corner_y - 1.5 * lip])
  right = np.array([half + dx, corner_y])
  top_y = mouth_y - 0.3 * gap - 1.8 * lip
  in_top = _curve(left, (dx, top_y), right)
  in_bottom = _curve(left, (dx, mouth_y + 0.7 * gap), right)
  out_top = _curve(left - (0.6, 0), (dx, top_y - 2.2), right + (0.6, 0))
  out_bottom = _curve(left - (0.6, 0), (dx, mouth_y + 0.7 * gap + 3.0), right + (0.6, 0))
  cavity = np.concatenate([in_top, in_bottom[::-1]])
  if gap > 0.6:
    _fill(img, cavity, (70, 22, 28))

    def teeth(canvas):
      tooth_h = min(0.45 * gap + 0.5 * lip + 0.6, 3.2)
      _fill(canvas, np.concatenate([in_top, (in_top + (0, tooth_h))[::-1]]), (242, 240, 232))

    _paint_clipped(img, cavity, teeth)
  _fill(img, np.concatenate([out_top, in_top[::-1]]), lk.lip)
  _fill(img, np.concatenate([in_bottom, out_bottom[::-1]]), _shade(lk.lip, 1.08))
  _stroke(img, in_top, _shade(lk.lip, 0.55), 0.5)


def _draw_face(params: np.ndarray, lk: Look) -> np.ndarray:
  """[224, 224, 4] uint8 RGBA canvas with the head on a transparent background.

  Drawn in face units (the face centre is (0, 0), y points down) on a canvas twice the output
  size with sub-pixel coordinates; `_finish` reduces it for anti-aliasing.
  """
  p = dict(zip(PARAMS, params.tolist()))
  canvas = np.zeros((_CANVAS, _CANVAS, 4), np.uint8)
  mouth_y = _nose_tip_y(lk, p) + lk.mouth_gap
  _draw_head(canvas, lk)
  _draw_cheeks(canvas, lk, p, mouth_y)
  _draw_nose(canvas, lk, p)
  _draw_eyes(canvas, lk, p)
  _draw_brows(canvas, lk, p)
  _draw_fringe(canvas, lk)
  _draw_mouth(canvas, lk, p, mouth_y)
  return canvas


# ----------------------------------------------------------------------------------------
# Pose, background, lighting, blur and noise at the output size. The arithmetic runs on
# separate colour planes: NumPy broadcasting a [H, W] map over a trailing axis of 3 is many
# times slower than whole-plane operations.

# Sensor noise and background blotches are cut at a random place from fixed fields: making
# them anew for every image would cost more than all of the drawing.
_NOISE = np.random.default_rng(20210601).standard_normal((256, 256, 3), dtype=np.float32)
_BLOTCHES = np.stack([cv2.resize(c, (256, 256), interpolation=cv2.INTER_CUBIC) for c in
                      np.random.default_rng(20210602).standard_normal((3, 10, 10),
                                                                      dtype=np.float32)])
# Output pixel coordinates in [-1, 1], for gradients.
_GRID_Y, _GRID_X = np.mgrid[-1:1:IMAGE_SIZE * 1j, -1:1:IMAGE_SIZE * 1j].astype(np.float32)


def _gradient(angle: float) -> np.ndarray:
  return _GRID_X * np.float32(math.cos(angle)) + _GRID_Y * np.float32(math.sin(angle))


def _offset(u: float, field: np.ndarray) -> int:
  return int(u * (field.shape[-2] - IMAGE_SIZE))


def _background(u: list[float]) -> list[np.ndarray]:
  """3 planes [112, 112] float32: a muted two-colour gradient with soft blotches."""
  grey = _scale(u[0], 40, 215)
  c0 = grey + _scale(u[1], 0.2, 0.7) * (_scale(np.array(u[2:5]), 15, 240) - grey)
  c1 = grey + _scale(u[5], 0.2, 0.7) * (_scale(np.array(u[6:9]), 15, 240) - grey)
  ramp = np.clip(0.5 + 0.5 * _gradient(u[9] * 2 * math.pi), 0, 1)
  oy, ox = _offset(u[10], _BLOTCHES), _offset(u[11], _BLOTCHES)
  blotch = _BLOTCHES[:, oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE] * np.float32(u[12] * 25)
  return [float(c0[c]) + float(c1[c] - c0[c]) * ramp + blotch[c] for c in range(3)]


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
  """RGBA face canvas -> final [112, 112, 3] uint8 image."""
  # Python floats: NumPy scalars would promote the float32 planes to float64.
  u = rng.random(24).tolist()
  n = rng.standard_normal(4).tolist()
  size = (IMAGE_SIZE, IMAGE_SIZE)
  layer = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
  # Scale > 1: crops are tight around the face, as in aligned face datasets.
  pose = cv2.getRotationMatrix2D((float(_ORIGIN[0]), float(_ORIGIN[1])),
                                 float(np.clip(6 * n[0], -15, 15)), _scale(u[0], 1.15, 1.35))
  pose[:, 2] += _scale(np.array(u[1:3]), -5, 5)
  planes = [p.astype(np.float32) for p in cv2.split(
      cv2.warpAffine(layer, pose, size, flags=cv2.INTER_LINEAR))]
  alpha = planes[3] * np.float32(1 / 255)
  background = _background(u[3:16])
  gain = _scale(u[16], 0.75, 1.15) * (1 + 0.4 * u[17] * _gradient(u[18] * 2 * math.pi))
  cast = [1 + 0.04 * x for x in n[1:4]]
  img = cv2.merge([(bg + (fg - bg) * alpha) * (gain * k)
                   for fg, bg, k in zip(planes[:3], background, cast)])
  sigma = 0.9 * u[19]
  if sigma > 0.3:
    img = cv2.GaussianBlur(img, (0, 0), sigma)
  oy, ox = _offset(u[20], _NOISE), _offset(u[21], _NOISE)
  img += _NOISE[oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE] * np.float32(_scale(u[22], 1, 6))
  return np.clip(img, 0, 255).astype(np.uint8)


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, Labels]:
  """Sample `index` of `split`: its [112, 112, 3] uint8 image and its labels."""
  rng = _generator(seed, split, index)
  labels, params = _sample_expression(rng, split)
  look = _sample_look(rng)
  return _finish(rng, _draw_face(params, look)), labels


def render_jpeg(seed: int, split: str, index: int) -> bytes:
  """JPEG bytes (quality 95) of sample `index`'s image."""
  image, _ = render(seed, split, index)
  # JPEG like the real datasets: with sensor noise, PNG is 4x larger and 20x slower.
  ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(image[..., ::-1]),
                         [cv2.IMWRITE_JPEG_QUALITY, 95])
  assert ok
  return buf.tobytes()


# ----------------------------------------------------------------------------------------
# Rendering in worker processes. The renderer is mostly Python, so threads would queue on
# the GIL. Workers are fresh interpreters running this module (not multiprocessing, whose
# workers re-import the caller's __main__, i.e. the whole training program, or fail on a
# script without a main guard); worker k renders the indices k, k + W, k + 2W, ... and
# streams length-prefixed JPEGs, so reading them round-robin gives them in index order.


def render_jpegs(seed: int, split: str, num: int, workers: int) -> Iterator[bytes]:
  """JPEGs of samples 0..num-1 of `split`, in order, rendered by `workers` processes."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  procs = [subprocess.Popen(
      [sys.executable, '-m', __name__, str(seed), split, str(k), str(num), str(workers)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for k in range(workers)]
  try:
    for i in range(num):
      proc = procs[i % workers]
      header = proc.stdout.read(4)
      if len(header) < 4:
        proc.wait()
        raise RuntimeError(f'SynthFER worker {i % workers} stopped before image {i}: '
                           f'{proc.stderr.read().decode(errors="replace")[-2000:]}')
      yield proc.stdout.read(int.from_bytes(header, 'little'))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
      proc.stdout.close()
      proc.stderr.close()


def _worker(seed: int, split: str, first: int, num: int, step: int) -> None:
  out = sys.stdout.buffer
  for index in range(first, num, step):
    data = render_jpeg(seed, split, index)
    out.write(len(data).to_bytes(4, 'little'))
    out.write(data)
  out.flush()


if __name__ == '__main__':
  _worker(int(sys.argv[1]), sys.argv[2], *(int(a) for a in sys.argv[3:6]))
