"""Student architectures come from configuration files, with clear errors."""
import json

import pytest

from juicer_pipeline.models.students import STUDENTS, load_student_arch
from juicer_pipeline.settings import TrainingSettings

from ..helpers import REPO, code_versions

EXPERIMENTS = REPO / "benchmarks" / "student_configs"  # experiment-only students, loaded by path


def test_packaged_students_load_and_differ_only_in_configuration():
    archs = {name: load_student_arch(name) for name in STUDENTS}
    archs |= {p.stem: load_student_arch(str(p)) for p in EXPERIMENTS.glob("*.json")}
    assert {"world-s", "world-xs", "vit-b-16"} == set(STUDENTS) and "world-s-patchify" in archs
    assert archs["world-s"].conv_stem and not archs["world-s-patchify"].conv_stem
    assert archs["world-s"].vision_width == archs["world-s-patchify"].vision_width
    # the world students share open_clip's custom block, so variants differ only in what they name
    assert {a.block_type for name, a in archs.items() if name.startswith("world-")} == {"custom"}


def test_a_student_json_file_is_a_student(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"vision_width": 48, "vision_layers": 1, "vision_heads": 2, "conv_stem": True}))
    assert load_student_arch(str(path)).vision_width == 48
    assert TrainingSettings(student=str(path)).student == str(path)


def test_bad_student_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a packaged config"):
        TrainingSettings(student="world-xxl")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vision_width": 48, "wings": 2}))
    with pytest.raises(ValueError, match=r"unknown keys \['wings'\]"):
        load_student_arch(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_student_arch(str(bad))


def test_a_model_folder_is_fingerprinted_by_its_files(tmp_path):
    from juicer_pipeline.models.loader import model_fingerprint

    folder = tmp_path / "captioner"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    first = model_fingerprint(f"file:{folder}")  # a folder used to raise IsADirectoryError here
    assert first == model_fingerprint(f"file:{folder}") and len(first) == 64
    (folder / "sub" / "weights.bin").write_bytes(b"\x01" * 10)
    assert model_fingerprint(f"file:{folder}") != first
    assert model_fingerprint(f"file:{tmp_path / 'absent'}") == "missing"


def test_the_method_never_imports_the_synthetic_world():
    import ast
    from pathlib import Path

    import juicer_pipeline.governance as governance

    offenders = []
    for path in Path(governance.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith("..world") or n.startswith("juicer_pipeline.world")]
    assert offenders == []


def test_editing_a_student_file_makes_the_checkpoints_unsynced(tmp_path):
    from juicer_pipeline.definitions import build_definitions
    from juicer_pipeline.settings import JuicerSettings

    path = tmp_path / "mine.json"
    versions = []
    for width in (48, 64):  # same file name, edited content
        path.write_text(json.dumps({"vision_width": width, "vision_layers": 1, "vision_heads": 2, "conv_stem": True}))
        defs = build_definitions(JuicerSettings(training=TrainingSettings(student=str(path))), tmp_path)
        versions.append(code_versions(defs))
    assert versions[0]["clip_checkpoint"] != versions[1]["clip_checkpoint"]
    assert versions[0]["training_set"] == versions[1]["training_set"]


def test_stem_depth_and_pooling_are_configuration():
    import torch

    from juicer_pipeline.models.kept_tokens import install_kept_tokens
    from juicer_pipeline.models.world_clip import build_clip, tiny_arch

    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.visual.conv1.modules())  # noqa: E731
    one, two = build_clip(tiny_arch(conv_stem=True)), build_clip(tiny_arch(conv_stem=True, stem_depth=2))
    assert convs(one) == 3 + 1 and convs(two) == 2 * 3 + 1  # one more 3×3 conv per stride-2 stage (plus the 1×1)
    avg = build_clip(tiny_arch(pool_type="avg")).eval()
    assert avg.visual.pool_type == "avg"
    kept = install_kept_tokens(avg)
    kept.indices = torch.tensor([[0, 5, 9]] * 2)
    assert avg.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # pools the kept patches only
    assert load_student_arch(str(EXPERIMENTS / "world-s-stem2.json")).stem_depth == 2
    with pytest.raises(ValueError, match="pool_type must be 'tok' or 'avg'"):
        tiny_arch(pool_type="max")
    with pytest.raises(ValueError, match="stem_depth must be at least 1"):
        tiny_arch(stem_depth=0)


def test_the_stem_first_stride_is_configuration():
    """A first stride of 4 replaces the two widest stride-2 stages by one 4×4 patchify; the later
    3×3 stage still reaches into the neighbouring patches."""
    import torch

    from juicer_pipeline.models.world_clip import ConvStem, build_clip, tiny_arch

    stem = ConvStem(96, 8, first_stride=4)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((4, 4), (4, 4), 48), ((3, 3), (2, 2), 96),
                                                                          ((1, 1), (1, 1), 96)]
    assert stem(torch.randn(2, 3, 64, 64)).shape == (2, 96, 8, 8)
    stem.eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., 8:16, 16:24] += 1  # one pixel patch changes (row 1, column 2 of the 8×8 grid) ...
    changed = (stem(x) - stem(y)).abs().sum(1)[0] > 0
    # ... and so do the tokens below and to its right, whose 3×3 window covers its last 4×4 cells
    assert changed.nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]
    model = build_clip(tiny_arch(conv_stem=True, stem_first_stride=4))
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert load_student_arch(str(EXPERIMENTS / "world-s-stem4.json")).stem_first_stride == 4
    for bad in (3, 1, 16):
        with pytest.raises(ValueError, match="stem_first_stride must be a power of two from 2 to the patch size"):
            tiny_arch(stem_first_stride=bad)


def test_the_conv_stem_computes_the_same_in_either_memory_layout():
    """The stem runs channels-last for speed; the result is the plain NCHW computation's."""
    import torch

    from juicer_pipeline.models.world_clip import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(32, 8, depth=2).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, plain = stem(x), stem.net(x.contiguous())
    assert out.shape == (4, 32, 4, 4)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_open_clips_custom_block_computes_the_default_blocks_function():
    """block_type "custom" (open_clip's own attention) holds the same parameters under the same
    names as the default nn.MultiheadAttention block; built from the same seed it starts from the
    same weights and gives the same image and text embeddings, kept-token and causal-masked passes
    included."""
    import torch

    from juicer_pipeline.governance.saliency import VisionPass
    from juicer_pipeline.models.kept_tokens import install_kept_tokens
    from juicer_pipeline.models.world_clip import build_clip, tiny_arch

    def built(block_type):  # the model and the next draw of the random stream after it
        torch.manual_seed(0)
        return build_clip(tiny_arch(conv_stem=True, block_type=block_type)).eval(), torch.rand(1)

    (default, after_default), (custom, after_custom) = built("default"), built("custom")
    assert type(custom.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    # a seed gives the same initial weights and leaves the same random stream in either block type
    assert default.state_dict().keys() == custom.state_dict().keys()
    assert all(torch.equal(v, custom.state_dict()[k]) for k, v in default.state_dict().items())
    assert torch.equal(after_default, after_custom)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 400, (3, 16))
    kept = [install_kept_tokens(m) for m in (default, custom)]
    with torch.no_grad():
        for indices in (None, torch.tensor([[0, 5, 9]] * 3)):
            for k in kept:
                k.indices = indices
            torch.testing.assert_close(custom.encode_image(images), default.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(custom.encode_text(tokens), default.encode_text(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_type must be 'default' or 'custom'"):
        tiny_arch(block_type="fast")
    with pytest.raises(ValueError, match="governor needs open_clip's default transformer blocks"):
        VisionPass(custom)  # attention saliency reads nn.MultiheadAttention's weights
