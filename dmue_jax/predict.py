r"""Finds the faces in photos and classifies their expressions with a trained model.

  python -m dmue_jax.predict --workdir runs/demo photo.jpg group.png
  python -m dmue_jax.predict --checkpoint runs/demo_export --json photo.jpg
  python -m dmue_jax.predict --workdir runs/demo --no-detect face_crop.png
  python -m dmue_jax.predict --workdir runs/demo --save-annotated annotated/ *.jpg

The model is the inference path of the workdir's best checkpoint, or of --checkpoint: an export
(python -m dmue_jax.export), a checkpoint step folder or, with --workdir, a step number. Faces are
found with OpenCV's frontal-face Haar cascade on a copy no longer than --detect-max-side pixels,
cropped from the full image with --margin of the box size added on each side, and put through the
run's evaluation transform; --no-detect classifies each whole image instead. --json prints one
JSON list, an entry per image (the format: `predict_files`). Exit status: 0 when every image was
read (an image without a face is a result, not an error), 1 when some image could not be read or
the model cannot be loaded, 2 for wrong flags.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
import cv2
import numpy as np

from dmue_jax import cli
from dmue_jax import inference
from dmue_jax.errors import UserError

FLAGS = flags.FLAGS


def _define_flags():
  # Only when run as a command: tests import this module beside others that define --workdir.
  flags.DEFINE_string('workdir', None, 'Training run folder; its best checkpoint is used.')
  flags.DEFINE_string('checkpoint', None, 'An export, a checkpoint step folder, or a step '
                      'number of --workdir; overrides the best checkpoint.')
  flags.DEFINE_boolean('json', False, 'Print one JSON list instead of text.')
  flags.DEFINE_boolean('no-detect', False, 'Classify each whole image; no face detection.')
  flags.DEFINE_string('save-annotated', None, 'Write the images with boxes and labels drawn: '
                      'a folder, or for a single image a file path (e.g. out.jpg).')
  flags.DEFINE_float('margin', 0.2, 'Fraction of the face box added on each side of the crop.')
  flags.DEFINE_integer('detect-max-side', 1024, 'Larger images are scaled down to this longest '
                       'side for detection (boxes are mapped back to the full image).')


CASCADE = 'haarcascade_frontalface_default.xml'
# Detection settings: OpenCV's usual values; minSize drops tiny false positives in textures.
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
MIN_FACE = 30


class ImageReadError(UserError):
  """An input image that cannot be read or decoded."""


# ------------------------------------------------------------------------------------ images
def read_image(path: str) -> np.ndarray:
  """Reads an image file -> uint8[H, W, 3] RGB (grey is expanded, alpha dropped)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageReadError(f'cannot read {path}: {e.strerror or e}.') from e
  if not data:
    raise ImageReadError(f'cannot read {path}: the file is empty.')
  try:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  except cv2.error:
    image = None
  if image is None:
    raise ImageReadError(f'cannot read {path}: not an image OpenCV can decode (unsupported '
                         'format, damaged file, or not an image at all).')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FaceDetector:
  """OpenCV's frontal-face Haar cascade, run on a copy of at most `max_side` pixels (a 24 MP
  photo would take seconds at full size and gain nothing: faces stay large enough)."""

  def __init__(self, max_side: int = 1024):
    path = os.path.join(cv2.data.haarcascades, CASCADE)
    self.cascade = cv2.CascadeClassifier(path)
    if self.cascade.empty():
      raise UserError(f'cannot load the face detector {path}; reinstall opencv-python-headless '
                      'or pass --no-detect.')
    self.max_side = max_side

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] RGB -> int[N, 4] boxes (x, y, w, h) in image pixels, left to right."""
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, self.max_side / max(h, w))
    if scale < 1.0:
      grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))),
                        interpolation=cv2.INTER_AREA)
    found = self.cascade.detectMultiScale(grey, scaleFactor=SCALE_FACTOR,
                                          minNeighbors=MIN_NEIGHBORS,
                                          minSize=(MIN_FACE, MIN_FACE))
    boxes = np.asarray(found, np.float64).reshape(-1, 4)
    # Back to full-image pixels, per axis (rounding made the two scales differ slightly).
    boxes *= [w / grey.shape[1], h / grey.shape[0]] * 2
    boxes = np.rint(boxes).astype(np.int64)
    boxes[:, 2] = np.minimum(boxes[:, 2], w - boxes[:, 0])
    boxes[:, 3] = np.minimum(boxes[:, 3], h - boxes[:, 1])
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


def crop(image: np.ndarray, box, margin: float) -> np.ndarray:
  """uint8[H, W, 3] -> the box grown by `margin` of its size on each side, clipped to the
  image. Training faces (e.g. RAF-DB's aligned crops) show the whole head, more than the
  cascade's box, hence the margin."""
  x, y, w, h = (int(v) for v in box)
  height, width = image.shape[:2]
  x0, y0 = max(0, round(x - margin * w)), max(0, round(y - margin * h))
  x1, y1 = min(width, round(x + w + margin * w)), min(height, round(y + h + margin * h))
  return image[y0:y1, x0:x1]


# ---------------------------------------------------------------------------------- predicting
def classify_image(image: np.ndarray, classifier: inference.Classifier,
                   detector: FaceDetector | None, *, margin: float = 0.2) -> list[dict]:
  """uint8[H, W, 3] -> one dict per face: {'box': [x, y, w, h], 'probabilities': {name: p},
  'label': name}. No detector: the whole image is the one face."""
  h, w = image.shape[:2]
  if detector is None:
    boxes = np.array([[0, 0, w, h]])
    crops = [image]
  else:
    boxes = detector(image)
    crops = [crop(image, b, margin) for b in boxes]
  probs = classifier.probabilities(crops)
  names = classifier.class_names
  return [{'box': [int(v) for v in box],
           'probabilities': {n: round(float(q), 6) for n, q in zip(names, p)},
           'label': names[int(np.argmax(p))]}
          for box, p in zip(boxes, probs)]


def format_text(result: dict) -> str:
  """A result as text: the image, then one line per face with the classes by probability."""
  if 'error' in result:
    return f'{result["image"]}: {result["error"]}'
  faces = result['faces']
  lines = [f'{result["image"]}: {len(faces) or "no"} face{"" if len(faces) == 1 else "s"}']
  for face in faces:
    ranked = sorted(face['probabilities'].items(), key=lambda kv: -kv[1])
    lines.append(f'  {face["box"]}  {face["label"]}  ('
                 + ', '.join(f'{n} {p:.3f}' for n, p in ranked) + ')')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------- annotating
def annotate(image: np.ndarray, faces: list[dict]) -> np.ndarray:
  """uint8[H, W, 3] RGB -> a copy with each face's box and 'label p' drawn."""
  out = image.copy()
  h, w = image.shape[:2]
  thickness = max(1, round(max(h, w) / 400))
  font_scale = max(0.4, max(h, w) / 1200)
  color = (0, 255, 0)
  for face in faces:
    x, y, bw, bh = face['box']
    cv2.rectangle(out, (x, y), (x + bw - 1, y + bh - 1), color, thickness)
    text = f'{face["label"]} {face["probabilities"][face["label"]]:.2f}'
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    # Above the box, or inside its top edge when the box touches the top of the image.
    top = y - th - base - thickness if y - th - base - thickness >= 0 else y + thickness
    cv2.rectangle(out, (x, top), (x + tw, top + th + base), color, cv2.FILLED)
    cv2.putText(out, text, (x, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                thickness, cv2.LINE_AA)
  return out


def annotation_paths(images: list[str], out: str) -> list[str]:
  """Where each image's annotated copy goes. `out` is a file path only for a single image and
  an image extension OpenCV can write; otherwise a folder, holding <stem>_annotated<ext>
  (never the input's own name, so that out = the input folder overwrites nothing)."""
  if (len(images) == 1 and not os.path.isdir(out) and not out.endswith(os.sep)
      and os.path.splitext(out)[1] and cv2.haveImageWriter(out)):
    return [out]
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--save-annotated {out} is a file; with several images give a folder.')
  paths, used = [], set()
  for image in images:
    stem, ext = os.path.splitext(os.path.basename(image))
    if not ext or not cv2.haveImageWriter('x' + ext):
      ext = '.png'
    name, n = f'{stem}_annotated{ext}', 1
    while name in used:  # two inputs with one name from different folders
      n += 1
      name = f'{stem}_annotated_{n}{ext}'
    used.add(name)
    paths.append(os.path.join(out, name))
  return paths


def write_image(path: str, image: np.ndarray) -> None:
  """Writes uint8[H, W, 3] RGB to `path` (format from its extension), creating folders."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    ok = cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  except cv2.error:
    ok = False
  if not ok:
    raise UserError(f'cannot write the annotated image {path}.')


# ------------------------------------------------------------------------------------ command
def predict_files(paths: list[str], classifier: inference.Classifier,
                  detector: FaceDetector | None, *, margin: float = 0.2,
                  annotated: list[str] | None = None, on_result=None) -> list[dict]:
  """Classifies each file; an unreadable one gives {'image', 'error'} and the rest go on.

  annotated: a path per image for the annotated copy, or None. on_result: called with each
  result as soon as it is ready (streams the text output).

  Returns one result per path, in order; `--json` prints this list:
    [{"image": path, "faces": [{"box": [x, y, w, h], "probabilities": {name: p, ...},
                                "label": name}, ...]}, ...]
  with each box in image pixels and "label" the most probable class; an image that cannot be
  read gives {"image": path, "error": message} (the command also reports it on stderr).
  """
  results = []
  for i, path in enumerate(paths):
    try:
      image = read_image(path)
    except ImageReadError as e:
      result = {'image': path, 'error': str(e)}
    else:
      result = {'image': path,
                'faces': classify_image(image, classifier, detector, margin=margin)}
      if annotated:
        write_image(annotated[i], annotate(image, result['faces']))
    results.append(result)
    if on_result is not None:
      on_result(result)
  return results


def main(argv):
  paths = argv[1:]
  if not paths:
    cli.fail('give one or more IMAGE paths after the flags, e.g. python -m dmue_jax.predict '
             '--workdir runs/demo photo.jpg')
  if not FLAGS.workdir and not FLAGS.checkpoint:
    cli.fail('give --workdir (a training run folder) or --checkpoint (an export or a '
             'checkpoint step folder).')
  if FLAGS.margin < 0:
    cli.fail(f'--margin={FLAGS.margin} must be >= 0.')
  max_side = FLAGS['detect-max-side'].value
  if max_side < MIN_FACE:
    cli.fail(f'--detect-max-side={max_side} must be at least {MIN_FACE}.')
  as_json = FLAGS.json

  def report(result):
    if 'error' in result:
      print(f'error: {result["error"]}', file=sys.stderr)
    elif not as_json:
      print(format_text(result), flush=True)

  with cli.user_errors():
    out = FLAGS['save-annotated'].value
    annotated = annotation_paths(paths, out) if out else None
    loaded = inference.load(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    classifier = inference.Classifier(loaded)
    detector = None if FLAGS['no-detect'].value else FaceDetector(max_side)
    results = predict_files(paths, classifier, detector, margin=FLAGS.margin,
                            annotated=annotated, on_result=report)
  if as_json:
    # One image per line: valid JSON that stays readable for many images.
    print('[\n' + ',\n'.join(json.dumps(r) for r in results) + '\n]')
  failed = sum('error' in r for r in results)
  if failed and len(results) > 1:
    cli.fail(f'{failed} of {len(results)} images could not be read.', 1)
  if failed:
    sys.exit(1)  # its one line is already on stderr


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
