import pytest

from fuxi_mme.config import Config, ConfigError, apply_mapping, apply_overrides, config_from_dict, load_yaml, validate
from fuxi_mme.presets import all_presets, build_preset, parse_preset


def test_overrides_are_typed():
    cfg = Config()
    apply_overrides(
        cfg, ["model.moe.num_experts=8", "train.lr=3e-4", "train.betas=0.9,0.99", "eval.ks=5,10", "data.time_col=none", "train.tf32=false"]
    )
    assert cfg.model.moe.num_experts == 8 and cfg.train.lr == 3e-4
    assert cfg.train.betas == (0.9, 0.99) and cfg.eval.ks == (5, 10)
    apply_overrides(cfg, ["eval.ks=[5, 20]"])  # the list as YAML or Python writes it
    assert cfg.eval.ks == (5, 20)
    assert cfg.data.time_col is None and cfg.train.tf32 is False


@pytest.mark.parametrize(
    "item, needle",
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("modle.dim=1", "unknown config key 'modle'"),
        ("model.dim=abc", "expected an integer"),
        ("train.tf32=maybe", "expected true/false"),
        ("model.dim", "section.field=value"),
        ("model.moe=3", "is a section"),
        ("data.min_rating=abc", "cannot read 'abc' as a number or none"),
    ],
)
def test_bad_overrides_name_the_problem(item, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(Config(), [item])


def test_validate_catches_bad_values():
    cfg = Config()
    cfg.model.num_embeddings = 3  # 50 is not divisible by 3
    with pytest.raises(ConfigError, match="divide model.dim"):
        validate(cfg)
    cfg = Config()
    cfg.data.protocol = "random"
    with pytest.raises(ConfigError, match="loo-val"):
        validate(cfg)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.epochs=0", "train.epochs=0 must be at least 1"),
        ("train.epochs=-1", "train.epochs=-1 must be at least 1"),
        ("train.eval_every=0", "train.eval_every=0 must be at least 1"),
        ("train.lr=-1", "train.lr=-1.0 must be positive"),
        ("train.lr=0", "train.lr=0.0 must be positive"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be 0 or more"),
        ("model.dropout=2", "model.dropout=2.0 must be in [0, 1)"),
        ("model.dropout=1", "model.dropout=1.0 must be in [0, 1)"),
        ("train.warmup_steps=-5", "train.warmup_steps=-5 must be 0 or more"),
        ("train.patience=0", "train.patience=0 must be at least 1 (or null"),
        ("model.num_embeddings=3", "divide model.dim=50 (set both; at this dim: 1, 2, 5)"),
        ("model.dim=-5", "model.dim=-5 must be at least 1"),
    ],
)
def test_training_settings_out_of_range_name_the_setting(setting, message):
    """Checked before anything runs: a run of no epochs or a negative learning rate used to train
    nothing (or reach the optimizer's own message without the setting's name)."""
    cfg = Config()
    apply_overrides(cfg, [setting])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)
    ok = Config()
    apply_overrides(ok, ["train.patience=none", "model.dropout=0", "train.warmup_steps=0"])
    validate(ok)


def test_yaml_and_json_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dim: 64\n  moe:\n    num_experts: 4\ntrain:\n  epochs: 3\n")
    cfg = apply_mapping(Config(), load_yaml(f))
    assert (cfg.model.dim, cfg.model.moe.num_experts, cfg.train.epochs) == (64, 4, 3)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_yaml(bad)
    assert "\n" not in str(err.value) and "line 2, column 1" in str(err.value)  # one line, with where
    bad.write_text("model:\n  dim: 64\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: mapping values are not allowed here at line 3, column 7$"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_presets_match_spec_shapes():
    c = build_preset("ml-1m-fuxi-alpha-base")
    m = c.model
    assert (m.dim, m.num_layers, m.num_heads, m.qk_dim, m.v_dim, m.ffn_multiply) == (50, 2, 1, 50, 50, 1.0)
    assert (c.data.max_len, c.train.batch_size, c.train.lr, c.train.betas, c.train.num_negatives, c.train.temperature, c.train.epochs) == (
        200,
        128,
        1e-3,
        (0.9, 0.98),
        128,
        0.05,
        101,
    )
    m = build_preset("ml-1m-fuxi-alpha-large").model
    assert (m.dim, m.num_layers, m.num_heads, m.qk_dim) == (50, 8, 2, 25)
    m = build_preset("ml-20m-fuxi-alpha-base").model
    assert (m.dim, m.num_layers, m.num_heads, m.qk_dim, m.ffn_multiply) == (256, 2, 4, 64, 4.0)
    m = build_preset("ml-20m-fuxi-alpha-large").model
    assert (m.dim, m.num_layers, m.num_heads, m.qk_dim, m.ffn_multiply) == (256, 8, 8, 32, 4.0)
    m = build_preset("ml-20m-sasrec-base").model
    assert (m.dim, m.num_layers, m.num_heads, m.ffn_dim) == (256, 4, 4, 256)
    for name in all_presets():
        validate(build_preset(name))
        assert parse_preset(name)[0] in name
    with pytest.raises(ConfigError, match="unknown preset"):
        parse_preset("ml-1m-transformer-xl")


def test_commit_is_read_without_git(tmp_path):
    from fuxi_mme.utils.runinfo import _read_git_head

    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    (tmp_path / "repo" / "src").mkdir()
    assert _read_git_head(tmp_path / "repo" / "src") == "a" * 40
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\n" + "b" * 40 + " refs/heads/main\n")
    assert _read_git_head(tmp_path / "repo" / "src") == "b" * 40


def test_compile_takes_true_false_or_auto():
    cfg = Config()
    assert cfg.train.compile == "auto"
    apply_overrides(cfg, ["train.compile=true"])
    assert cfg.train.compile is True
    apply_overrides(cfg, ["train.compile=off"])
    assert cfg.train.compile is False
    apply_overrides(cfg, ["train.compile=sometimes"])
    with pytest.raises(ConfigError, match="train.compile='sometimes' must be true, false or auto"):
        validate(cfg)


@pytest.mark.parametrize(
    "preset, want",
    [
        # (M, qk_dim, v_dim, ffn_multiply, shared_decoder, dim): the item tables keep the total width d
        ("ml-1m-fuxi-mme-base", (2, 50, 50, 4.0, False, 50)),  # ML-1M group: full-width heads, experts x4, per-stream decoders
        ("ml-1m-ts70-fuxi-mme-large", (2, 25, 25, 4.0, False, 50)),
        ("kuairand-pure-fuxi-mme-base", (2, 50, 50, 4.0, False, 50)),
        ("ml-100k-fuxi-mme-base", (2, 25, 25, 1.0, True, 50)),  # ML-100K keeps the first defaults
        ("amazon-sports-fuxi-mme-base", (8, 32, 32, 1.0, True, 64)),  # Amazon: eight streams, full-width heads
        ("ml-20m-fuxi-mme-base", (2, 32, 32, 4.0, True, 256)),  # not measured: first defaults
        ("demo-fuxi-mme-base", (2, 24, 24, 1.0, True, 48)),
    ],
)
def test_fuxi_mme_decoder_defaults_follow_the_capacity_choice(preset, want):
    m = build_preset(preset).model
    assert (m.num_embeddings, m.qk_dim, m.v_dim, m.ffn_multiply, m.shared_decoder, m.dim) == want
    assert (m.moe.num_experts, m.moe.top_k, m.moe.placement) == (4, 2, "ffn")
    validate(build_preset(preset))


def test_large_amazon_fuxi_and_hstu_models_train_with_dropout_0_6():
    """The `dropout` suite's choice: d = 256 FuXi-alpha, Fuxi-MME and HSTU on Amazon at 0.6; the
    base sizes, SASRec large and the MovieLens presets keep their shapes' dropout."""
    for ds in ("amazon-beauty", "amazon-sports", "amazon-toys"):
        for model in ("fuxi-alpha", "fuxi-mme", "hstu"):
            assert build_preset(f"{ds}-{model}-large").model.dropout == 0.6
            assert build_preset(f"{ds}-{model}-base").model.dropout == 0.5
        assert build_preset(f"{ds}-sasrec-large").model.dropout == 0.5
    assert build_preset("ml-1m-fuxi-mme-large").model.dropout == 0.2


def test_large_amazon_fuxi_models_train_at_temperature_0_07():
    """The `temperature` suite's choice: d = 256 FuXi-alpha and Fuxi-MME on Amazon at T = 0.07;
    every other preset keeps the published 0.05 (docs/models.md#loss)."""
    from fuxi_mme.presets import all_presets

    chosen = {f"{ds}-{m}-large" for ds in ("amazon-beauty", "amazon-sports", "amazon-toys") for m in ("fuxi-alpha", "fuxi-mme")}
    for name in all_presets():
        assert build_preset(name).train.temperature == (0.07 if name in chosen else 0.05), name
