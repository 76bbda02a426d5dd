"""Routing rules: which models a series gets, and why a rule does not match."""

from __future__ import annotations

import pytest
from machaon.rules import Match, Rule, SeriesFacts, explain, matching
from machaon.tools import phantom

from tests.harness import acknowledged, run_machaon, storescu

SAX = SeriesFacts(series_uid="1.2.3", modality="MR", sop_classes={"1.2.840.10008.5.1.4.1.1.4"},
                  series_description="SAX cine", protocol_name="cine_ssfp", body_part="HEART",
                  image_type=("ORIGINAL", "PRIMARY", "OTHER"), calling_aets={"MRI1"}, slices=12,
                  rows=256, columns=256)


@pytest.mark.parametrize("condition, reason", [
    ({"modality": ["CT"]}, "modality is MR, not CT"),
    ({"sop_class": ["1.2.840.10008.5.1.4.1.1.2"]}, "SOP class 1.2.840.10008.5.1.4.1.1.4 is not listed"),
    ({"series_description": "^lax"}, "series description 'SAX cine' does not match /^lax/"),
    ({"protocol_name": "flow"}, "protocol name 'cine_ssfp' does not match /flow/"),
    ({"body_part": ["CHEST"]}, "body part is HEART, not CHEST"),
    ({"image_type": ["DERIVED"]}, "image type ORIGINAL\\PRIMARY\\OTHER lacks DERIVED"),
    ({"calling_aet": ["CT1", "CT2"]}, "sent by MRI1, not CT1 or CT2"),
    ({"min_slices": 20}, "12 slices, fewer than 20"),
    ({"max_slices": 1}, "12 slices, more than 1"),
    ({"min_size": 512}, "images are 256x256, smaller than 512"),
    ({"max_size": 128}, "images are 256x256, larger than 128"),
])
def test_each_condition_says_why_it_does_not_match(condition, reason):
    assert explain(Rule(name="r", models=["m"], match=Match(**condition)), SAX) == [reason]


def test_all_conditions_that_hold_match_case_insensitively():
    rule = Rule(name="r", models=["m"], match=Match(
        modality=["MR"], series_description="sax", protocol_name="SSFP", body_part=["heart"],
        image_type=["original"], calling_aet=["MRI1"], min_slices=3, max_slices=40, min_size=128, max_size=512))
    assert explain(rule, SAX) == []


def test_matching_rules_come_highest_priority_first():
    rules = [Rule(name="low", models=["a"], priority=1), Rule(name="never", models=["b"], match=Match(modality=["CT"])),
             Rule(name="high", models=["c"], priority=5)]
    assert [r.name for r in matching(rules, SAX)] == ["high", "low"]
    assert matching([], SAX) == []


def test_rules_test_on_a_folder_explains_each_series(tmp_path):
    phantom.write_study(tmp_path / "study", seed=4)
    (tmp_path / "study" / "README.txt").write_text("not DICOM")  # other files are passed over
    done = run_machaon("rules", "test", str(tmp_path / "study"), env={"COLUMNS": "200"}, check=True)
    # The embedded default routes short-axis cardiac MR stacks to lv-segmentation.
    assert "'SAX cine (phantom)', 12 images of 256x256\n  match cardiac-short-axis (priority 10): models lv-segmentation" in done.stdout
    assert ("no    cardiac-short-axis: series description 'TWO CHAMBER cine (phantom)' does not match "
            "/sax|short.?axis/; 1 slices, fewer than 3\n  no rule matched") in done.stdout


def test_rules_test_on_a_received_study_sees_the_calling_ae(serve, tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=6, views=False)
    server = serve()
    assert acknowledged(storescu(server.port, *study.sax_files, aet="MRI1").stderr) == phantom.SAX_SLICES
    server.config.write_text(server.config.read_text() + (
        '[[rules]]\nname = "from-mri1"\nmodels = ["lv-segmentation"]\nmatch = { calling_aet = ["MRI1"] }\n'
        '[[rules]]\nname = "from-ct"\nmodels = ["lv-segmentation"]\nmatch = { calling_aet = ["CT1"] }\n'))
    done = run_machaon("rules", "test", study.study_uid, config=server.config, env={"COLUMNS": "200"}, check=True)
    assert "match from-mri1" in done.stdout
    assert "no    from-ct: sent by MRI1, not CT1" in done.stdout


def test_a_bad_rule_stops_start_up_naming_it(tmp_path):
    config = tmp_path / "machaon.toml"
    config.write_text('[[rules]]\nname = "x"\nmodels = ["lv-segmentation"]\nmatch = { series_description = "((" }\n')
    done = run_machaon("rules", "test", str(tmp_path), config=config)
    assert done.returncode == 78
    assert f"rules.0.match.series_description (set in {config}): Value error, not a valid regular expression" in done.stderr
    config.write_text('[[rules]]\nname = "x"\nmodels = []\n')
    done = run_machaon("rules", "test", str(tmp_path), config=config)
    assert done.returncode == 78 and "rules.0.models" in done.stderr
