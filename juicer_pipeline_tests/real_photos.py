"""A real-photo drop in img2dataset's WebDataset layout, from the photographs that scikit-image and
scikit-learn ship (test-only dependencies), with hand-written captions and a matching vocabulary."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (file of skimage.data or sklearn's sample images, hand-written caption)
PHOTOS = [
    ("astronaut.png", "An astronaut in a white spacesuit in front of the American flag."),
    ("camera.png", "A black and white photo of a man looking through a camera on a tripod."),
    ("chelsea.png", "A ginger tabby cat looking at the camera."),
    ("coffee.png", "A cup of coffee with a spoon on a saucer."),
    ("coins.png", "Old coins lying on a dark background."),
    ("hubble_deep_field.jpg", "Distant galaxies in the Hubble deep field."),
    ("ihc.png", "A microscope image of stained tissue."),
    ("moon.png", "The surface of the moon with its craters."),
    ("page.png", "A scanned page of printed text."),
    ("rocket.jpg", "A rocket on the launch pad."),
    ("motorcycle_left.png", "A motorcycle parked in a workshop."),
    ("brick.png", "A brick wall."),
    ("grass.png", "Close-up of green grass."),
    ("gravel.png", "Gravel on the ground."),
    ("retina.jpg", "The retina at the back of a human eye."),
    ("clock_motion.png", "A wall clock blurred by motion."),
    ("china.jpg", "A Chinese temple among trees."),
    ("flower.jpg", "A close-up of a pink flower."),
]
VOCABULARY = """# real classes for the photographs above
astronaut: spaceman
camera
cat: kitten
coffee: espresso
coin
galaxy: galaxies
tissue
moon
text: page
rocket
motorcycle: motorbike
wall
grass
gravel
eye: retina
clock
temple
flower
"""


def _photo(name: str) -> Image.Image:
    if name in ("china.jpg", "flower.jpg"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))
    import skimage.data

    arr = np.asarray(Image.open(Path(skimage.data.__file__).parent / name))
    return Image.fromarray(arr)


def write_real_photo_drop(folder: Path) -> list[tuple[str, str]]:
    """One shard `00000.tar` as img2dataset writes it (KEY.jpg re-encoded at quality 95, KEY.txt,
    KEY.json), with img2dataset's per-shard `00000.parquet` and `00000_stats.json` beside it.
    Returns [(key, caption)]."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, (name, caption) in enumerate(PHOTOS):
            key = f"{i:09d}"
            img = _photo(name)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)  # grey photos stay grey: an odd mode for ingestion to convert
            meta = {"url": f"https://example.org/photos/{name}", "key": key, "caption": caption,
                    "status": "success", "width": img.width, "height": img.height}
            for suffix, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            rows.append((key, caption))
    import pandas as pd

    pd.DataFrame({"key": [k for k, _ in rows], "status": "success"}).to_parquet(folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return rows
