"""The shared normalizer: every bad image is a reason, never an exception; good images come out clean."""
import io

import pytest
from PIL import Image

from data_prep.normalize import ImageRejected, NormalizeConfig, normalize_document, normalize_image
from data_prep.raw import RawDoc, RawImage, RawText
from prep_corpora import bomb_png, image_bytes, truncated

CFG = NormalizeConfig(max_image_side=64, min_image_side=16, max_aspect=3.0, min_text_chars=5)


def reason(data, cfg=CFG):
    with pytest.raises(ImageRejected) as e:
        normalize_image(data, cfg)
    return e.value.reason


def test_each_kind_of_bad_image_has_its_reason():
    jpeg = image_bytes(200, 150, 1, "JPEG")
    assert reason(b"") == "empty_file"
    assert reason(b"this is a caption, not a picture") == "not_an_image"
    assert reason(b"%PDF-1.4 not allowed") == "not_an_image"
    assert reason(truncated(jpeg)) == "bad_image"
    assert reason(truncated(image_bytes(200, 150, 1, "PNG"))) == "bad_image"
    corrupt = bytearray(image_bytes(200, 150, 2, "PNG"))
    corrupt[60:80] = b"\xff" * 20  # inside IDAT: the checksum or the inflate fails
    assert reason(bytes(corrupt)) == "bad_image"
    assert reason(bomb_png(30000)) == "image_too_large"  # 900 MP claimed in a tiny file: never decoded
    assert reason(jpeg, NormalizeConfig(max_image_bytes=100)) == "image_too_large"
    assert reason(image_bytes(10, 40, 3)) == "image_too_small"
    assert reason(image_bytes(200, 40, 4)) == "bad_aspect"


def test_resize_keeps_aspect_and_reencodes_by_source():
    out = normalize_image(image_bytes(400, 300, 5, "JPEG"), CFG)
    assert out.ext == "jpg" and out.orig_size == (400, 300)
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.format == "JPEG" and im.size == (64, 48) and im.mode == "RGB"
        assert not im.info.get("exif")
    png = normalize_image(image_bytes(30, 90, 6, "PNG"), CFG)
    with Image.open(io.BytesIO(png.data)) as im:
        assert im.format == "PNG" and im.size == (21, 64)
    assert normalize_image(image_bytes(400, 300, 5, "JPEG"), CFG).data == out.data  # deterministic


def test_transparency_is_flattened_on_white_and_exif_orientation_applied():
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = normalize_image(buf.getvalue(), CFG)
    with Image.open(io.BytesIO(out.data)) as o:
        assert o.mode == "RGB" and o.getpixel((5, 5)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    Image.new("RGB", (60, 30), (10, 200, 10)).save(buf, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(normalize_image(buf.getvalue(), CFG).data)) as o:
        assert o.size == (30, 60)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result_every_time():
    cfg = NormalizeConfig(max_image_side=128)
    data = image_bytes(1200, 800, 7, "JPEG")
    a, b = normalize_image(data, cfg), normalize_image(data, cfg)
    assert a.data == b.data and a.sha256 == b.sha256
    with Image.open(io.BytesIO(a.data)) as im:
        assert im.size == (128, 85)


def doc(*parts, require_image=False, error=""):
    return RawDoc("x", "test", list(parts), require_image=require_image, error=error)


def test_document_keeps_good_images_and_counts_dropped_ones():
    good = image_bytes(40, 40, 8)
    res = normalize_document(doc(RawText("Hello there, world."), RawImage(data=b"junk", src="a.png"),
                                 RawImage(data=good, src="b.png"), RawImage(error="missing_image", src="c.png"),
                                 RawText(" more")), CFG)
    assert res.doc is not None and res.reason == ""
    assert dict(res.images_rejected) == {"not_an_image": 1, "missing_image": 1}
    assert [s.type for s in res.doc.segments] == ["text", "image", "text"]
    assert list(res.doc.images) == ["0000.png"]
    assert res.doc.meta["images"] == [{"src": "b.png", "orig_size": [40, 40]}]
    assert len(res.image_sha256) == 1 and len(res.doc_sha256) == 64


def test_document_level_reasons():
    img = RawImage(data=image_bytes(40, 40, 9))
    assert normalize_document(doc(RawText("long enough text")), CFG).doc is not None
    assert normalize_document(doc(RawText("hi"), img), CFG).reason == "text_too_short"
    assert normalize_document(doc(RawText("   "), RawImage(error="bad_image")), CFG).reason == "empty_document"
    assert normalize_document(doc(), CFG).reason == "empty_document"
    assert normalize_document(doc(RawText("bad \udcff surrogate text")), CFG).reason == "bad_encoding"
    assert normalize_document(doc(error="bad_html"), CFG).reason == "bad_html"
    # a pair needs its image: it is rejected under the image's reason
    pair = doc(RawImage(error="outside_root"), RawText("a fine caption"), require_image=True)
    res = normalize_document(pair, CFG)
    assert res.reason == "outside_root" and res.images_rejected == {"outside_root": 1}


def test_document_hash_ignores_ids_and_meta_but_not_content():
    img = image_bytes(40, 40, 10)
    a = normalize_document(RawDoc("a", "s", [RawText("same text here"), RawImage(data=img)], meta={"k": 1}), CFG)
    b = normalize_document(RawDoc("b", "t", [RawText("same text here"), RawImage(data=img)], meta={"k": 2}), CFG)
    c = normalize_document(RawDoc("c", "s", [RawImage(data=img), RawText("same text here")]), CFG)
    assert a.doc_sha256 == b.doc_sha256 != c.doc_sha256
    assert a.doc.id != b.doc.id


def test_config_refuses_impossible_settings():
    with pytest.raises(ValueError, match="min_text_chars"):
        NormalizeConfig(min_text_chars=0)
    with pytest.raises(ValueError, match="min_image_side"):
        NormalizeConfig(min_image_side=100, max_image_side=50)
