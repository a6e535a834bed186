"""A deterministic synthetic detection dataset, written in both VOC and COCO layout.

Six shape classes (:data:`CLASS_NAMES`) are painted on cluttered textured backgrounds. Each class
has its own shape, colour family and preferred texture; colour families of some classes overlap
(circle/cross are both red, square/ring both blue), so a detector has to look at shape too.
Objects range from ~10 px to ~110 px, occlude each other, are cut by the image border, and some
images are empty.

Layout written under ``root`` (images are shared by both layouts)::

    JPEGImages/000000.jpg ...               train ids first, then test ids
    Annotations/000000.xml ...              VOC XML, 1-based inclusive pixel boxes
    ImageSets/Main/{train,test}.txt
    annotations/instances_{train,test}.json COCO, bbox [x, y, w, h] in pixels
    classes.txt                             one class name per line
    .complete                               fingerprint of the generator; written last

Generation is deterministic: the same seed and counts give byte-identical files.

Domains (``domain``): ``"source"``, the set above; ``"fog"``, a second camera for domain
adaptation: the same classes, shapes and colour families, on backgrounds of another texture
(large soft cells instead of lines and blobs), seen through haze of a light colour, with a colour
cast, a blur and sensor noise, each drawn per image (:func:`shift_to_fog`).
"""
import contextlib
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import cv2
import numpy as np

from ..utils.io import current_umask

__all__ = ["CLASS_NAMES", "DOMAINS", "SPLITS", "COMPLETE_MARKER", "generate_synthetic_dataset",
           "is_synthetic_dataset_complete", "shift_to_fog"]

# Bump whenever the generated content changes, so cached copies are regenerated.
GENERATOR_VERSION = 1

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring")
SPLITS = ("train", "test")
DOMAINS = ("source", "fog")
COMPLETE_MARKER = ".complete"

# Per class: OpenCV hue range (0-180, may wrap past 180) and the texture it usually carries.
_CLASS_STYLES = {
    "circle": ((-10, 10), "solid"),
    "square": ((105, 125), "checker"),
    "triangle": ((45, 75), "stripes"),
    "star": ((15, 35), "solid"),
    "cross": ((160, 185), "stripes"),  # red like circle
    "ring": ((92, 112), "noise"),  # blue like square
}
_TEXTURES = ("solid", "stripes", "checker", "noise")
_PREFERRED_TEXTURE_PROB = 0.6

_IMAGE_SIDE_RANGE = (224, 288)  # each side drawn independently, inclusive
_MAX_OBJECTS = 6
_EMPTY_FRACTION = 0.03
_SMALL_FRACTION = 0.14  # share of objects drawn from the small band
_SMALL_SIZE_RANGE = (10.0, 16.0)  # object diameter, px
_SIZE_RANGE = (16.0, 112.0)  # log-uniform, px
_BORDER_FRACTION = 0.12  # share of objects placed across an image border
_MIN_INSIDE_FRACTION = 0.45  # of a shape's area that must fall inside the image
_MIN_VISIBLE_FRACTION = 0.5  # of an object's in-image area that later objects must leave visible
_DIFFICULT_SIZE = 12  # px: objects whose visible box is smaller on both sides are "difficult"
_DIFFICULT_VISIBLE_FRACTION = 0.6  # objects more occluded than this are "difficult"
_PLACEMENT_TRIES = 30
_JPEG_QUALITY = 95


def fingerprint(seed: int, num_train: int, num_test: int, domain: str = "source") -> str:
    """Content of the completion marker: identifies what a finished dataset directory holds."""
    content = {"generator": "pgp_det.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
               "num_train": int(num_train), "num_test": int(num_test)}
    if domain != "source":  # the source set's marker stays what it was before there were domains
        content["domain"] = domain
    return json.dumps(content, sort_keys=True)


def is_synthetic_dataset_complete(root: str, seed: int = 0, num_train: int = 600, num_test: int = 150,
                                  domain: str = "source") -> bool:
    """Whether ``root`` holds a finished dataset made with these arguments by this generator version."""
    try:
        with open(os.path.join(root, COMPLETE_MARKER)) as f:
            return f.read() == fingerprint(seed, num_train, num_test, domain)
    except OSError:
        return False


def generate_synthetic_dataset(root: str, seed: int = 0, num_train: int = 600, num_test: int = 150,
                               domain: str = "source") -> None:
    """Write the synthetic dataset under ``root`` unless a complete copy is already there.

    The set is built in a temporary directory beside ``root`` and renamed into place, so ``root``
    is either absent or complete; an incomplete or outdated ``root`` is replaced. A lock file
    beside ``root`` (``.<name>.lock``) serialises concurrent callers, e.g. training processes.

    Args:
        root: directory to hold the dataset.
        seed: seed of all randomness; the same seed and counts give byte-identical files.
        num_train, num_test: number of images in each split.
        domain: ``"source"`` or ``"fog"`` (see the module docstring).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; domains are {', '.join(DOMAINS)}")
    if is_synthetic_dataset_complete(root, seed, num_train, num_test, domain):
        return
    root = os.path.abspath(root)
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with _exclusive_lock(os.path.join(parent, "." + base + ".lock")):
        # another process may have finished it while this one waited for the lock
        if is_synthetic_dataset_complete(root, seed, num_train, num_test, domain):
            return
        staging = tempfile.mkdtemp(prefix="." + base + ".tmp-", dir=parent)
        try:
            _write_dataset(staging, seed, {"train": num_train, "test": num_test}, domain)
            # mkdtemp makes the folder private (0700); the dataset is for every user of the machine
            os.chmod(staging, 0o777 & ~current_umask())
            if os.path.lexists(root):  # incomplete or made with other arguments
                stale = tempfile.mkdtemp(prefix="." + base + ".old-", dir=parent)
                os.rename(root, os.path.join(stale, base))
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(staging, root)
            except OSError:
                # without flock another process may have renamed its identical set first
                if not is_synthetic_dataset_complete(root, seed, num_train, num_test, domain):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: str):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Writing


def _write_dataset(out_dir: str, seed: int, counts: Dict[str, int], domain: str = "source") -> None:
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"), "annotations"):
        os.makedirs(os.path.join(out_dir, sub))
    first_index = 0
    for split_code, split in enumerate(SPLITS):
        num_images = counts[split]
        # each split has its own random streams, so changing one count leaves the other split as is
        empty = _choose_empty_images(np.random.default_rng([seed, split_code, 1 << 30]), num_images)
        file_ids, coco_images, coco_annotations = [], [], []
        for i in range(num_images):
            file_id = f"{first_index + i:06d}"
            rng = np.random.default_rng([seed, split_code, i])
            image, objects = render_image(rng, empty=i in empty, domain=domain)
            height, width = image.shape[:2]
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"could not encode {file_id}.jpg")
            with open(os.path.join(out_dir, "JPEGImages", file_id + ".jpg"), "wb") as f:
                f.write(jpeg.tobytes())
            with open(os.path.join(out_dir, "Annotations", file_id + ".xml"), "w") as f:
                f.write(_voc_xml(file_id + ".jpg", width, height, objects))
            file_ids.append(file_id)
            image_id = first_index + i + 1  # COCO ids start at 1
            coco_images.append({"id": image_id, "file_name": file_id + ".jpg", "width": width, "height": height})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                coco_annotations.append({
                    "id": len(coco_annotations) + 1, "image_id": image_id,
                    "category_id": CLASS_NAMES.index(obj["name"]) + 1,
                    "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "area": obj["area"], "iscrowd": 0,
                })
        first_index += num_images
        with open(os.path.join(out_dir, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(fid + "\n" for fid in file_ids))
        coco = {
            "info": {"description": f"pgp_det synthetic shapes, {split} split", "version": str(GENERATOR_VERSION)},
            "images": coco_images,
            "annotations": coco_annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASS_NAMES)],
        }
        with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(n + "\n" for n in CLASS_NAMES))
    # last: its presence means every other file is complete
    with open(os.path.join(out_dir, COMPLETE_MARKER), "w") as f:
        f.write(fingerprint(seed, counts["train"], counts["test"], domain))


def _choose_empty_images(rng: np.random.Generator, num_images: int) -> set:
    """Indices of the images left without objects: ~3%, at least one once a split has 10 images."""
    num_empty = int(round(_EMPTY_FRACTION * num_images))
    if num_images >= 10:
        num_empty = max(num_empty, 1)
    return set(rng.choice(num_images, size=num_empty, replace=False).tolist()) if num_empty else set()


def _voc_xml(filename: str, width: int, height: int, objects: List[dict]) -> str:
    """A PASCAL VOC annotation; boxes are written as 1-based inclusive pixel indices."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "pgp_det synthetic shapes"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(node, "difficult").text = str(int(obj["difficult"]))
        box = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
            ET.SubElement(box, key).text = str(value + 1)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


# ----------------------------------------------------------------------------------------------
# Rendering


def render_image(rng: np.random.Generator, empty: bool = False, domain: str = "source") -> Tuple[np.ndarray, List[dict]]:
    """Draw one image and its objects, in ``domain``'s look (see the module docstring).

    Returns:
        image: (H, W, 3) uint8 BGR, H and W in 224-288.
        objects: dicts with ``name``, ``box`` (x0, y0, x1, y1) 0-based inclusive pixel indices of the
            visible part, ``area`` (visible pixels), ``truncated`` and ``difficult`` (bools).
    """
    height, width = (int(v) for v in rng.integers(_IMAGE_SIDE_RANGE[0], _IMAGE_SIDE_RANGE[1] + 1, size=2))
    image = _background(rng, height, width) if domain == "source" else _cell_background(rng, height, width)
    num_objects = 0 if empty else int(rng.integers(1, _MAX_OBJECTS + 1))

    placed = []  # dicts: name, visible (in-image mask minus later occluders), area_in, inside
    for _ in range(num_objects):
        name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        for _ in range(_PLACEMENT_TRIES):
            mask, inside = _place_shape(rng, name, height, width)
            if inside < _MIN_INSIDE_FRACTION:
                continue
            # later objects cover earlier ones: keep every earlier object mostly visible
            if all(np.count_nonzero(p["visible"] & ~mask) >= _MIN_VISIBLE_FRACTION * p["area_in"] for p in placed):
                break
        else:
            continue  # no room for this object in a crowded image
        for p in placed:
            p["visible"] &= ~mask
        placed.append({"name": name, "visible": mask, "inside": inside, "area_in": np.count_nonzero(mask)})
        _paint_object(rng, image, mask, name)

    if domain == "fog":
        image = shift_to_fog(image, rng)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, [_describe(p) for p in placed]


def shift_to_fog(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fog domain's camera: ``image`` ((H, W, 3) float BGR, 0-255) seen through haze (blended
    35-55% towards a light grey of its own tint), with a colour cast (per-channel gains), a blur
    (sigma 0.8-1.6 px) and sensor noise (sigma 4-9 grey levels); float32, same shape."""
    haze = _hsv_to_bgr(rng.uniform(90, 130), rng.uniform(5, 30), rng.uniform(185, 225))
    strength = np.float32(rng.uniform(0.35, 0.55))
    image = image.astype(np.float32) * (1 - strength) + haze * strength
    image *= np.array([rng.uniform(1.0, 1.12), rng.uniform(0.95, 1.05), rng.uniform(0.8, 0.92)], dtype=np.float32)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.8, 1.6))
    return image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(4, 9))


def _cell_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The fog domain's backgrounds: large soft cells of muted colours (a coarse random field,
    upsampled and blurred) with grain; (H, W, 3) float32 BGR."""
    cells = rng.integers(3, 7)
    field = np.stack([_hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 80), rng.uniform(50, 210))
                      for _ in range(int(cells * cells))]).reshape(int(cells), int(cells), 3)
    image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(4.0, 10.0))
    return image + rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(3, 8))


def _describe(obj: dict) -> dict:
    visible = obj["visible"]
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    area = int(np.count_nonzero(visible[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    small = max(box[2] - box[0] + 1, box[3] - box[1] + 1) < _DIFFICULT_SIZE
    return {
        "name": obj["name"], "box": box, "area": area,
        "truncated": obj["inside"] < 1.0,
        "difficult": bool(small or area < _DIFFICULT_VISIBLE_FRACTION * obj["area_in"]),
    }


def _hsv_to_bgr(hue: float, saturation: float, value: float) -> np.ndarray:
    pixel = np.array([[[int(round(hue)) % 180, int(saturation), int(value)]]], dtype=np.uint8)
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted colour gradient with grain and clutter (lines, soft blobs); (H, W, 3) float32 BGR."""
    def muted():
        return _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 70), rng.uniform(60, 200))

    start, end = muted(), muted()
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.arange(width, dtype=np.float32)[None, :] * np.float32(np.cos(angle))
         + np.arange(height, dtype=np.float32)[:, None] * np.float32(np.sin(angle)))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = start + (end - start) * t[..., None]
    # grey-level grain: as good a clutter as per-channel noise at a third of the cost
    image += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(4, 12))

    # clutter that is not an object: thin lines of any colour, blurred blobs of muted colour
    for _ in range(int(rng.integers(3, 11))):
        if rng.random() < 0.5:
            p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            colour = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 200), rng.uniform(40, 230))
            cv2.line(image, p1, p2, colour.tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(6, 41)), int(rng.integers(6, 41)))
            colour = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 90), rng.uniform(40, 220))
            cv2.ellipse(image, centre, axes, rng.uniform(0, 180), 0, 360, colour.tolist(), -1, cv2.LINE_AA)
    return cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.4))


def _draw_size(rng: np.random.Generator) -> float:
    """Object diameter in px: a band of small objects plus log-uniform sizes up to ~110 px."""
    if rng.random() < _SMALL_FRACTION:
        return rng.uniform(*_SMALL_SIZE_RANGE)
    low, high = np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])
    return float(np.exp(rng.uniform(low, high)))


def _place_shape(rng: np.random.Generator, name: str, height: int, width: int) -> Tuple[np.ndarray, float]:
    """Random size, pose and position for one shape.

    Returns:
        mask: (H, W) bool, the shape's pixels inside the image.
        inside: fraction of the shape's area that lies inside the image (1.0: not truncated).
    """
    radius = _draw_size(rng) / 2
    angle = rng.uniform(0, 2 * np.pi)
    # mostly inside the image (a large object may still touch a border), sometimes across a border
    margin = 0.8 * radius
    cx = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    cy = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    if rng.random() < _BORDER_FRACTION:
        offset = rng.uniform(-0.5, 0.5) * radius
        side = int(rng.integers(4))
        if side == 0:
            cx = offset
        elif side == 1:
            cx = width - 1 - offset
        elif side == 2:
            cy = offset
        else:
            cy = height - 1 - offset

    # rasterise in a local window, so the part outside the image is counted too
    half = int(np.ceil(radius)) + 2
    left, top = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    local = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.uint8)
    _draw_shape(local, name, cx - left, cy - top, radius, angle)
    total = np.count_nonzero(local)

    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + local.shape[1], width), min(top + local.shape[0], height)
    if total == 0 or x1 <= x0 or y1 <= y0:
        return mask, 0.0
    mask[y0:y1, x0:x1] = local[y0 - top:y1 - top, x0 - left:x1 - left] > 0
    return mask, np.count_nonzero(mask) / total


_SHIFT = 4  # cv2 fractional bits: vertices at 1/16 px


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def _polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return _fixed(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1))


def _draw_shape(canvas: np.ndarray, name: str, cx: float, cy: float, radius: float, angle: float) -> None:
    """Fill shape ``name`` of circumradius ``radius`` px, centred at (cx, cy), into a uint8 canvas."""
    centre = tuple(int(v) for v in _fixed(np.array([cx, cy])))
    if name in ("circle", "ring"):
        cv2.circle(canvas, centre, int(round(radius * (1 << _SHIFT))), 1, -1, cv2.LINE_8, _SHIFT)
        if name == "ring":
            cv2.circle(canvas, centre, int(round(0.52 * radius * (1 << _SHIFT))), 0, -1, cv2.LINE_8, _SHIFT)
        return
    if name == "square":
        k = np.arange(4)
        points = _polygon(cx, cy, np.full(4, radius), angle + np.pi / 4 + k * np.pi / 2)
    elif name == "triangle":
        k = np.arange(3)
        points = _polygon(cx, cy, np.full(3, radius), angle + k * 2 * np.pi / 3)
    elif name == "star":
        k = np.arange(10)
        points = _polygon(cx, cy, np.where(k % 2 == 0, radius, 0.45 * radius), angle + k * np.pi / 5)
    elif name == "cross":
        a, w = 0.96 * radius, 0.3 * radius  # arm length, arm half-width
        outline = np.array([(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
                            (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)])
        c, s = np.cos(angle), np.sin(angle)
        points = _fixed(outline @ np.array([[c, s], [-s, c]]) + np.array([cx, cy]))
    else:
        raise ValueError(f"unknown shape {name!r}")
    cv2.fillPoly(canvas, [points], 1, cv2.LINE_8, _SHIFT)


def _paint_object(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Paint a textured object in its class's colour family onto ``image`` (float32 BGR) where ``mask``."""
    (hue_low, hue_high), preferred = _CLASS_STYLES[name]
    hue = rng.uniform(hue_low, hue_high)
    saturation, value = rng.uniform(150, 255), rng.uniform(150, 255)
    primary = _hsv_to_bgr(hue, saturation, value)
    secondary = _hsv_to_bgr(hue, saturation * rng.uniform(0.6, 1.0), value * rng.uniform(0.4, 0.65))
    texture = preferred if rng.random() < _PREFERRED_TEXTURE_PROB else _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    period = rng.uniform(4, 9)
    stripe_angle = rng.uniform(0, np.pi)
    noise_sigma = rng.uniform(2, 6)

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    gy = np.arange(y0, y1, dtype=np.float32)[:, None]
    gx = np.arange(x0, x1, dtype=np.float32)[None, :]
    if texture == "solid":
        weight = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    elif texture == "stripes":
        weight = (np.floor((gx * np.cos(stripe_angle) + gy * np.sin(stripe_angle)) / period) % 2).astype(np.float32)
    elif texture == "checker":
        weight = ((np.floor(gx / period) + np.floor(gy / period)) % 2).astype(np.float32)
    else:  # "noise": speckle between the two tones
        weight = rng.random((y1 - y0, x1 - x0), dtype=np.float32)
    patch = primary + (secondary - primary) * weight[..., None]
    patch += rng.standard_normal(patch.shape, dtype=np.float32) * noise_sigma
    window = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][window] = patch[window]
