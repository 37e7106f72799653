"""The governor's model card says which training terms shaped it and shows their scores."""
from juicer_pipeline.models.model_card import write_model_card

EVAL = {"step": 10, "semantic_i2t_r@1": 0.5, "semantic_t2i_r@1": 0.4, "zeroshot_top1": 0.9, "crop_shape_top1": 0.8,
        "saliency_recall@0.5": 0.97, "maskclip_pointing": 0.71}


def _card(tmp_path, **config) -> str:
    record = {"config": {"seed": 0, **config}, "scores": EVAL, "evals": [EVAL], "steps_done": 10,
              "held_out_scores": {"semantic_i2t_r@1": 0.3, "maskclip_pointing": 0.65, "instance_i2t_r@1": 0.1}}
    return write_model_card(tmp_path / "g.safetensors", "abc", record).read_text()


def test_the_card_names_the_objectness_and_dense_terms_and_reports_pointing(tmp_path):
    card = _card(tmp_path, saliency_weight=1.0, dense_weight=0.5)
    assert "Objectness term (weight 1.0)" in card and "Dense word-patch term (weight 0.5)" in card
    assert "| maskclip_pointing | 0.710 |" in card  # corpus validation
    assert "| maskclip_pointing | 0.650 |" in card  # held out
    assert "| instance_i2t_r@1 | 0.100 |" not in card  # held-out instance recall is not reported
    assert "| 10 | 0.500 | 0.400 | 0.900 | 0.800 | 0.970 | 0.710 |" in card  # the learning curve row


def test_a_contrastive_only_card_names_no_extra_term(tmp_path):
    card = _card(tmp_path)
    assert "Objectness term" not in card and "Dense word-patch term" not in card
