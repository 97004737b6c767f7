"""The settings tree: the paper profile's presets and what overrides them."""
from schemas.settings import PAPER_PROFILE, Settings


def test_the_paper_profile_presets_what_the_released_code_does(monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("INTERNEG_")]:
        monkeypatch.delenv(name)
    stream, paper = Settings(), Settings(profile="paper")
    assert (stream.method.lexicon, stream.classes.prototype_augment, stream.model.crop_fraction, stream.bank.dedup_cos) == (
        "debian", False, 1.0, 0.95)
    assert (paper.method.lexicon, paper.classes.prototype_augment, paper.model.crop_fraction, paper.bank.dedup_cos) == (
        "paper", True, 0.875, None)
    assert set(PAPER_PROFILE) == {"method", "classes", "model", "bank"}
    # a setting given explicitly wins over the profile, from the environment or in code
    monkeypatch.setenv("INTERNEG_PROFILE", "paper")
    monkeypatch.setenv("INTERNEG_BANK__DEDUP_COS", "0.9")
    from_env = Settings()
    assert from_env.profile == "paper" and from_env.bank.dedup_cos == 0.9 and from_env.method.lexicon == "paper"
    assert Settings(profile="paper", model={"crop_fraction": 1.0}).model.crop_fraction == 1.0
