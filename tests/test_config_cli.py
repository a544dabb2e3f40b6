import math

import pytest

from monitor.cli import main
from monitor.config import Config, ConfigError


def test_toml_then_environment(tmp_path):
    path = tmp_path / "forewarn.toml"
    path.write_text('[kafka]\ntopic = "plant"\nmax_poll_records = 100\n[detector]\nthreshold = 0.99\n')
    cfg = Config.load(path, environ={"FOREWARN_KAFKA_MAX_POLL_RECORDS": "250", "FOREWARN_KAFKA_SECURITY_PROTOCOL":
                                     "SASL_SSL", "FOREWARN_KAFKA_SASL_MECHANISM": "PLAIN",
                                     "FOREWARN_KAFKA_SASL_PLAIN_USERNAME": "mon",
                                     "FOREWARN_KAFKA_SASL_PLAIN_PASSWORD": "pw"})
    assert (cfg.kafka.topic, cfg.kafka.max_poll_records, cfg.detector.threshold) == ("plant", 250, 0.99)
    assert cfg.kafka.security() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                                    "sasl_plain_username": "mon", "sasl_plain_password": "pw"}


@pytest.mark.parametrize("toml, message", [
    ("[kafka]\ntopik = 'x'\n", "kafka.topik: unknown setting"),
    ("[kafka]\nmax_poll_records = 'many'\n", "kafka.max_poll_records: expected an integer"),
    ("[kafka]\nauto_offset_reset = 'middle'\n", "auto_offset_reset must be earliest or latest"),
    ("[kafka]\nmax_timestamp_ahead_s = -60\n", "kafka.max_timestamp_ahead_s must be >= 0 seconds"),
    ("[kafka]\nproducer_partitioner = 'random'\n", "producer_partitioner must be auto, murmur2, crc32 or none"),
    ("[detector]\nthreshold = 2\n", "detector.threshold must be in \\(0, 1\\), got 2"),
    ("[detector]\nnovelty_window = 8\n", "detector.novelty_window must be 0 or >= 16, got 8"),
    ("[detector]\nalarm_surprise = -3\n", "detector.alarm_surprise must be in 0..1e\\+300, got -3"),
    ("[detector]\nalarm_surprise = 1e308\n", "detector.alarm_surprise must be in 0..1e\\+300"),  # none reaches it
    ("[detector]\nthreshold = 0.99\nalarm_surprise = 65\n",
     "detector.threshold \\(0.99\\) and detector.alarm_surprise \\(65.0\\) both set the alarm level"),
    ("[detector]\nonline_every = -1\n", "detector.online_every must be in 0..2147483647, got -1"),
    # past 2**63 it read as "every reading", and a larger one crashed the first update
    ("[detector]\nonline_every = 9223372036854775808\n", "detector.online_every must be in 0..2147483647"),
    # fields of Kafka's protocol: accepted, they crashed the daemon at the first topic made or restore
    ("[state]\nchangelog_replication = 40000\n", "state.changelog_replication must be -1 .* or in 1..32767"),
    ("[state]\nmax_snapshot_bytes = 3000000000\n", "state.max_snapshot_bytes must be in 65536..1073741824"),
    ("[kafka]\nssl_password = 'pw'\n", "kafka.ssl_password unlocks the client key .* neither is set"),
    ("[detector]\nsmoothing_span = -1\n", "detector.smoothing_span must be >= 0"),
    ("[detector]\npeak_window = 2\n", "detector.peak_window must be 0 or >= 4, got 2"),
    ("[detector]\nchannel_combination = 'mean'\n", "detector.channel_combination must be one of joint, max"),
    ("[nope]\na = 1\n", "unknown section [nope]"),
    ("[state]\ncheckpoint_interval_s = nan\n", "state.checkpoint_interval_s: expected a finite number"),
    ("[metrics]\nhealthy_after_s = inf\n", "metrics.healthy_after_s: expected a finite number"),
    ("[kafka]\nsession_timeout_ms = 3000\nheartbeat_interval_ms = 3000\n",
     "heartbeat_interval_ms \\(3000\\) must be below kafka.session_timeout_ms"),
    ("[kafka\n", "not valid TOML"),
    # an output read back as the input: every dead letter would come back as a new bad record, forever
    ("[kafka]\ntopic = 'plant'\ndead_letter_topic = 'plant'\n", "kafka.dead_letter_topic is the input topic"),
    ("[kafka]\nscores_topic = 'sensors'\n", "kafka.scores_topic is the input topic"),
    ("[kafka]\ngroup_id = 'fw'\nanomalies_topic = 'fw-state'\n",
     "the state changelog topic 'fw-state' is also kafka.anomalies_topic"),
    ("[state]\nchangelog_topic = 'sensors'\n", "the state changelog topic 'sensors' is also kafka.topic"),
    ("[kafka]\ntopic = 'plant 1'\n", "kafka.topic: 'plant 1' is not a legal Kafka topic name"),
    ("[kafka]\nsasl_mechanism = 'SCRAM'\n", "kafka.sasl_mechanism: unknown 'SCRAM'"),
    # each of these passed, and kafka-python found them only when it connected
    ("[kafka]\nsecurity_protocol = 'SASL_SSL'\n", "kafka.security_protocol SASL_SSL needs kafka.sasl_mechanism"),
    ("[kafka]\nsasl_mechanism = 'PLAIN'\nsasl_plain_username = 'u'\nsasl_plain_password = 'p'\n",
     "kafka.sasl_mechanism PLAIN is used only with kafka.security_protocol SASL_PLAINTEXT or SASL_SSL"),
    ("[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'SCRAM-SHA-512'\nsasl_plain_username = 'u'\n",
     "kafka.sasl_mechanism SCRAM-SHA-512 needs kafka.sasl_plain_username and kafka.sasl_plain_password"),
    ("[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_mechanism = 'GSSAPI'\n",
     "kafka.sasl_mechanism GSSAPI needs the gssapi package"),
    ("[kafka]\nsecurity_protocol = 'SSL'\nssl_cafile = '/nonexistent/ca.pem'\n",
     "kafka.ssl_cafile: no such file '/nonexistent/ca.pem'"),
    ("[kafka]\nssl_cafile = '/etc/hostname'\n", "kafka.ssl_cafile is used only with kafka.security_protocol SSL"),
    ("[kafka]\nfetch_max_wait_ms = 400000\n", "kafka.fetch_max_wait_ms \\(400000\\) must be below"),
    # SQLite takes both, for a database gone when the daemon stops
    ("[state]\nstore = 'local'\nlocal_path = ''\n", "state.local_path must name a file"),
    ("[state]\nstore = 'local'\nlocal_path = ':memory:'\n", "state.local_path must name a file"),
    # each of these passed, and failed later: a refused join, a 30 s bootstrap, a start-up that never ends
    ("[kafka]\ngroup_id = ''\n", "kafka.group_id must not be empty"),
    ("[kafka]\nbootstrap_servers = ' , '\n", "kafka.bootstrap_servers must be a comma-separated host:port list"),
    ("[kafka]\nbootstrap_servers = 'a:9092,'\n", "no empty entry"),
    ("[detector]\nwarmup = 100000000000\n", "detector.warmup must be in 16..16384"),
    # a stop waits for the poll under way; an idle loop turns once per poll, and /healthz between
    ("[kafka]\npoll_timeout_ms = 60000\n", "kafka.poll_timeout_ms \\(60000\\) must be <= 10000"),
    ("[kafka]\npoll_timeout_ms = 8000\n[metrics]\nhealthy_after_s = 5\n",
     "kafka.poll_timeout_ms \\(8000\\) must be under half of metrics.healthy_after_s"),
    ("topic = 'plant'\n", "topic = ... at the top level: settings go in their section, here under [kafka]"),
    # each of these passed, and the daemon failed once started, naming no setting
    ("[kafka]\ngroup_id = 'team/forewarn'\n", "state.changelog_topic \\(by default kafka.group_id \\+ '-state'"),
    ("[kafka]\nbootstrap_servers = 'host:notaport'\n", "kafka.bootstrap_servers: 'host:notaport' is not host:port"),
    ("[kafka]\nbootstrap_servers = 'a:9092,b:99999'\n", "'b:99999' is not host:port with a port in 1..65535"),
    ("[kafka]\nbootstrap_servers = ':9092'\n", "':9092' is not host:port"),
    ("[kafka]\nbootstrap_servers = 'a b:1'\n", "'a b:1' is not host:port with a port in 1..65535 and a host name "
                                               "of A-Z a-z 0-9 . _ - or an IP address"),  # was taken
    ("[kafka]\nmax_poll_interval_ms = 3000000000\n", "kafka.max_poll_interval_ms must be in 1..2147483647"),
    # adapted on as a warm-up is, at the same memory cost
    ("[detector]\ndrift_window = 100000000\n", "detector.drift_window must be in 16..16384, got 100000000"),
    ("[detector]\nonline_window = 100000000\n", "detector.online_window must be in 16..16384"),
    ("[detector]\nadapt_steps = 100000000\n", "detector.adapt_steps must be in -1..1000"),
    ("[detector]\nmax_streams = 0\n", "detector.max_streams must be >= 1, got 0"),  # the one key named
])
def test_invalid_configuration_is_rejected_with_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        Config.load(path, environ={})


@pytest.mark.parametrize("environ, message", [
    ({"FOREWARN_KAFKA_TOPICS": "plant"}, "unknown setting in the environment: FOREWARN_KAFKA_TOPICS"),
    ({"FOREWARN_DETECTOR_ONLINE_LR_SCALE": "nan"}, "FOREWARN_DETECTOR_ONLINE_LR_SCALE: expected a finite number"),
    ({"FOREWARN_METRIC_PORT": "9200"}, "unknown setting in the environment: FOREWARN_METRIC_PORT"),  # a section
    ({"FOREWARN_DETECTORS_WARMUP": "64"}, "unknown setting in the environment: FOREWARN_DETECTORS_WARMUP"),
    # a setting spelt without its section, or without an underscore, was ignored in silence
    ({"FOREWARN_BOOTSTRAP_SERVERS": "kafka:9092"},
     r"did you mean FOREWARN_KAFKA_BOOTSTRAP_SERVERS \(not FOREWARN_BOOTSTRAP_SERVERS\)\?"),
    ({"FOREWARN_KAFKATOPIC": "plant"}, r"FOREWARN_KAFKA_TOPIC \(not FOREWARN_KAFKATOPIC\)"),
    ({"FOREWARN_LOGLEVEL": "DEBUG"}, r"FOREWARN_LOG_LEVEL \(not FOREWARN_LOGLEVEL\)"),
    ({"FOREWARN_GROUP_ID": "plant"}, r"FOREWARN_KAFKA_GROUP_ID \(not FOREWARN_GROUP_ID\)"),
    ({"FOREWARN_KAFKA_TOPICS": "plant"}, r"FOREWARN_KAFKA_TOPIC \(not FOREWARN_KAFKA_TOPICS\)"),
    ({"FOREWARN_METRIC_PORT": "9108"}, r"FOREWARN_METRICS_PORT \(not FOREWARN_METRIC_PORT\)"),
    # a Service named forewarn-state: a link's address, no misspelling of state.store to suggest
    ({"FOREWARN_STATE_PORT": "tcp://10.0.0.1:9108"}, r"FOREWARN_STATE_PORT \(`forewarn config --print`.*service links"),
    # int() takes all of these; none is what anyone meant to type
    ({"FOREWARN_DETECTOR_WARMUP": " 128 "}, "FOREWARN_DETECTOR_WARMUP: expected an integer"),
    ({"FOREWARN_DETECTOR_WARMUP": "1_28"}, "FOREWARN_DETECTOR_WARMUP: expected an integer"),
    ({"FOREWARN_DETECTOR_WARMUP": "\u0661\u0662\u0668"}, "FOREWARN_DETECTOR_WARMUP: expected an integer"),
])
def test_invalid_environment_is_rejected_with_the_variable(environ, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=environ)
    Config.load(environ={"FOREWARN_HOME": "/srv", "FOREWARN_DATA": "/data"})  # not settings: none of ours
    # what Kubernetes sets for a Service named forewarn
    Config.load(environ={"FOREWARN_SERVICE_HOST": "10.0.0.7", "FOREWARN_SERVICE_PORT": "9108",
                         "FOREWARN_PORT": "tcp://10.0.0.7:9108", "FOREWARN_PORT_9108_TCP_PORT": "9108"})
    # and for one named forewarn-metrics: refused, saying what to do (the manifests turn the links off)
    with pytest.raises(ConfigError, match="look like Kubernetes service links.*enableServiceLinks: false"):
        Config.load(environ={"FOREWARN_METRICS_PORT": "tcp://10.0.0.8:9108"})


def test_the_request_timeout_the_configuration_checks_against_is_kafka_python_s():
    from kafka import KafkaConsumer

    from monitor.config import KAFKA_REQUEST_TIMEOUT_MS
    assert KafkaConsumer.DEFAULT_CONFIG["request_timeout_ms"] == KAFKA_REQUEST_TIMEOUT_MS


def test_the_alarm_level_as_a_surprise_from_the_environment_and_the_command_line(capsys):
    cfg = Config.load(environ={"FOREWARN_DETECTOR_ALARM_SURPRISE": "65"})
    assert cfg.detector.scoring_config().alarm_level == 65.0
    assert Config.load(environ={}).detector.scoring_config().alarm_level == 3.0  # the threshold's, 0.999
    with pytest.raises(SystemExit):
        main(["replay", "x.csv", "--threshold", "0.99", "--alarm-surprise", "65"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_run_with_a_bad_configuration_exits_with_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[metrics]\nport = 70000\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "metrics.port must be in 0..65535" in capsys.readouterr().err


def test_config_print_and_run_help_show_every_setting(capsys, monkeypatch):
    monkeypatch.setenv("FOREWARN_KAFKA_SASL_PLAIN_PASSWORD", "secret")
    assert main(["config", "--print"]) == 0
    printed = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    for section in ("kafka", "detector", "metrics", "log"):
        for name in vars(getattr(Config(), section)):
            assert f"{name} = " in printed and f"{name} = " in help_text
    assert "secret" not in printed and "# sasl_plain_password = (set; not shown)" in printed


def test_config_print_reads_back_as_the_same_configuration(tmp_path, capsys, monkeypatch):
    """A value with a line break, a quote or a backslash is written escaped, as TOML wants."""
    monkeypatch.setenv("FOREWARN_KAFKA_CLIENT_ID", 'fw "1"\\\nb')
    assert main(["config", "--print"]) == 0
    saved = tmp_path / "forewarn.toml"
    saved.write_text(capsys.readouterr().out)
    monkeypatch.delenv("FOREWARN_KAFKA_CLIENT_ID")
    assert Config.load(saved, environ={}).kafka.client_id == 'fw "1"\\\nb'


def test_a_configuration_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[kafka]\nclient_id = 'gr\u00fcn'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text"):
        Config.load(path, environ={})


def test_a_configuration_saved_from_config_print_holds_no_stand_in_for_the_password(tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setenv("FOREWARN_KAFKA_SASL_PLAIN_PASSWORD", "secret")
    monkeypatch.setenv("FOREWARN_KAFKA_SASL_PLAIN_USERNAME", "forewarn")
    assert main(["config", "--print"]) == 0
    saved = tmp_path / "forewarn.toml"
    saved.write_text(capsys.readouterr().out)
    assert Config.load(saved, environ={}).kafka.sasl_plain_password == ""
    assert Config.load(saved, environ={}).kafka.sasl_plain_username == "forewarn"  # not a secret: saved as set
    from_env = Config.load(saved, environ={"FOREWARN_KAFKA_SASL_PLAIN_PASSWORD": "secret"})
    assert from_env.kafka.sasl_plain_password == "secret"


@pytest.mark.parametrize("value", ["123456789", "['hunter2']", "{ p = 'hunter2' }"])
def test_a_password_of_the_wrong_type_is_not_shown_in_the_error(tmp_path, value):
    path = tmp_path / "forewarn.toml"
    path.write_text(f"[kafka]\nsasl_plain_password = {value}\n")
    with pytest.raises(ConfigError, match="sasl_plain_password: expected a string") as caught:
        Config.load(path, environ={})
    assert "123456789" not in str(caught.value) and "hunter2" not in str(caught.value)


def test_the_ssl_key_password_is_passed_through_and_never_printed(tmp_path, capsys, monkeypatch):
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    env = {"FOREWARN_KAFKA_SECURITY_PROTOCOL": "SSL", "FOREWARN_KAFKA_SSL_KEYFILE": str(key),
           "FOREWARN_KAFKA_SSL_PASSWORD": "keysecret"}
    assert Config.load(environ=env).kafka.security()["ssl_password"] == "keysecret"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "--print"]) == 0
    printed = capsys.readouterr().out
    assert "keysecret" not in printed and "# ssl_password = (set; not shown)" in printed


@pytest.mark.parametrize("argv, message", [
    (["config", "--config", ""], "an empty configuration file name"),   # was ": is a directory"
    (["replay", ""], "argument input: an empty file name"),              # was ".: is a directory"
    (["--threads", "50000", "config"], "--threads: must be in 1..1024"),  # crashed torch's thread pool
    (["meta-train", "--data", "x", "--out", "y", "--hidden", "100000"], "--hidden: must be in 1..4096"),
    # the K new streams adapt with: 100,000 held a replay for hours, where --adapt-steps stops at 1,000
    (["meta-train", "--data", "x", "--out", "y", "--inner-steps", "100000"], "--inner-steps: must be in 0..1000"),
    (["replay-to-kafka", "r.csv", "--topic", "t", "--bootstrap-servers", ""], "--bootstrap-servers: empty"),
])
def test_empty_names_and_counts_past_what_can_run_are_clear_errors(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err


def test_replay_to_kafka_bootstrap_servers_replaces_a_bad_configured_value(tmp_path, capsys, monkeypatch):
    """The option takes the setting's place: the value it replaces is not checked (it was, and
    refused a run that named a good broker); the option's own value is, named as the option."""
    monkeypatch.setenv("FOREWARN_KAFKA_BOOTSTRAP_SERVERS", "kafka:0")
    recording = tmp_path / "r.csv"
    recording.write_text("ts,value\n1,2\n")
    assert main(["replay-to-kafka", str(recording), "--topic", "t", "--bootstrap-servers", "a b:1"]) == 2
    err = capsys.readouterr().err
    assert "--bootstrap-servers: 'a b:1' is not host:port" in err and "kafka:0" not in err
    # the configuration's own errors keep their names: the option is not blamed for them
    monkeypatch.delenv("FOREWARN_KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.setenv("FOREWARN_KAFKA_BOOTSTRAP_SERVER", "kafka:9092")  # an S missing
    assert main(["replay-to-kafka", str(recording), "--topic", "t", "--bootstrap-servers", "localhost:9092"]) == 2
    assert "did you mean FOREWARN_KAFKA_BOOTSTRAP_SERVERS" in capsys.readouterr().err


def test_detector_options_reach_the_pipeline_from_the_environment_and_the_replay_flags():
    from prometheus_client import CollectorRegistry

    from monitor.checkpoint import Initialization
    from monitor.cli import _pipeline_config, build_parser
    from monitor.daemon import Daemon
    daemon = Daemon(Config.load(environ={"FOREWARN_DETECTOR_SMOOTHING_SPAN": "9",
                                         "FOREWARN_DETECTOR_NOVELTY_UNIT": "0.003",
                                         "FOREWARN_DETECTOR_CHANNEL_COMBINATION": "max",
                                         "FOREWARN_DETECTOR_PEAK_WINDOW": "48"}), registry=CollectorRegistry())
    scoring = daemon.pipeline.config.scoring
    assert (scoring.smoothing_span, scoring.novelty_unit, scoring.channel_combination, scoring.peak_window) == \
        (9, 0.003, "max", 48)
    args = build_parser().parse_args(["replay", "in.csv", "--smoothing-span", "9", "--calibration-fading", "0.002",
                                      "--channel-combination", "max", "--peak-window", "48"])
    scoring = _pipeline_config(args, Initialization.default()).scoring
    assert (scoring.smoothing_span, scoring.calibration_fading, scoring.channel_combination, scoring.peak_window) == \
        (9, 0.002, "max", 48)
    default = _pipeline_config(build_parser().parse_args(["replay", "in.csv"]), Initialization.default()).scoring
    assert default.channel_combination == Config().detector.channel_combination == "joint"


def test_every_detector_option_of_the_demo_reaches_its_daemon_as_given():
    """The demo passed its options to its daemon as environment variables written out one by
    one, a second copy of the mapping that replay's options go through."""
    from dataclasses import asdict

    from monitor.cli import DETECTOR_OPTIONS, _demo_environment, _detector_config, build_parser
    given = ["--warmup", "64", "--adapt-steps", "3", "--threshold", "0.99", "--calibration-fading", "0.002",
             "--novelty-unit", "3.3e-05", "--novelty-window", "4000", "--smoothing-span", "9",
             "--peak-window", "48", "--channel-combination", "max", "--drift-threshold", "30",
             "--online-every", "64"]
    args = build_parser().parse_args(["demo", *given])
    detector = _detector_config(args)
    changed = {k for k, v in asdict(detector).items() if v != getattr(Config().detector, k)}
    assert changed == set(DETECTOR_OPTIONS) - {"alarm_surprise"} | {"adapt_steps"}  # alarm_surprise: with threshold
    assert Config.load(environ=_demo_environment("127.0.0.1:9092", 0, detector)).detector == detector
    args = build_parser().parse_args(["demo", "--alarm-surprise", "64", "--channel-combination", "max"])
    assert Config.load(environ=_demo_environment("b:1", 0, _detector_config(args))).detector.alarm_surprise == 64


def test_adapt_steps_minus_one_is_the_initialization_s_for_replay_as_for_the_daemon_and_the_demo(capsys):
    from monitor.checkpoint import Initialization
    from monitor.cli import _pipeline_config, build_parser
    init = Initialization.default()
    assert Config().detector.adapt_steps == -1  # the daemon's default, "the initialization's"
    for given, steps in (("-1", init.adapt.steps), ("0", 0), ("3", 3)):
        args = build_parser().parse_args(["replay", "in.csv", "--adapt-steps", given])
        assert _pipeline_config(args, init).adapt.steps == steps
    for command in (["replay", "in.csv"], ["demo"]):
        for bad in ("-2", "5000"):  # 5000: refused, as detector.adapt_steps is, before a broker starts
            with pytest.raises(SystemExit):
                build_parser().parse_args([*command, "--adapt-steps", bad])
            assert f"argument --adapt-steps: must be in 0..1000, or -1 for the initialization's, got {bad}" in \
                capsys.readouterr().err


def test_meta_train_refuses_a_starting_checkpoint_of_another_size_before_reading_data(tmp_path, capsys):
    from monitor.checkpoint import Initialization
    from monitor.forecaster import LSTMSpec
    Initialization.random(LSTMSpec(hidden=8)).save(tmp_path / "small.pt")
    code = main(["meta-train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out.pt"),
                 "--start-from", str(tmp_path / "small.pt"), "--quiet"])
    assert code == 2 and "is an LSTM" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_meta_train_refuses_an_output_it_cannot_write_before_reading_data(tmp_path, capsys):
    assert main(["meta-train", "--data", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_meta_train_on_a_directory_reads_its_recordings_only_and_counts_what_it_left_out(tmp_path, capsys):
    import math
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [f"{1700000000 + 60 * t},{math.sin(t / 5) + (t % 7) / 10:.4f}" for t in range(120)]
    rows[50] = rows[50].split(",")[0] + ",n/a"
    (corpus / "pump.csv").write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    (corpus / "README.md").write_text("# not data\n")
    (corpus / "labels.json").write_text('{"pump.csv": []}')
    out = tmp_path / "init.pt"
    assert main(["meta-train", "--data", str(corpus), "--out", str(out), "--iterations", "2", "--tasks-per-batch",
                 "2", "--warmup", "32", "--query", "16", "--inner-steps", "1", "--hidden", "4", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "from 1 files" in err and "1 bad records left out: {'non_numeric_value': 1}" in err
    from monitor.checkpoint import Initialization
    assert Initialization.load(out).info["data"] == ["pump.csv"]


def test_meta_train_says_when_a_rate_it_was_given_has_no_effect(tmp_path, capsys):
    import math
    csv = tmp_path / "pump.csv"
    csv.write_text("timestamp,value\n" + "\n".join(f"{1700000000 + 60 * t},{math.sin(t / 5):.4f}" for t in range(120)))
    common = ["meta-train", "--data", str(csv), "--iterations", "1", "--tasks-per-batch", "2", "--warmup", "32",
              "--query", "16", "--inner-steps", "1", "--hidden", "4", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a.pt"), "--algorithm", "pooled", "--step-size-lr", "0.1"]) == 0
    assert "note: --step-size-lr has no effect here (--algorithm pooled)" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--algorithm", "reptile", "--meta-lr", "0.01",
                 "--reptile-step", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "note: --meta-lr has no effect here (--algorithm reptile)" in err and "--reptile-step has" not in err
    assert main([*common, "--out", str(tmp_path / "c.pt"), "--algorithm", "maml", "--step-size-lr", "0.1"]) == 0
    assert "no effect" not in capsys.readouterr().err


def test_options_that_do_nothing_in_a_mode_are_named_not_ignored(capsys):
    from monitor.cli import main
    assert main(["evaluate", "--dataset", "smd", "--limit", "2", "--windows", "x.json", "--detectors", "nosuch",
                 "--data", "no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "note: --limit has no effect here (--dataset smd)" in err
    assert "note: --windows has no effect here (--dataset smd)" in err
    assert "unknown detector 'nosuch'" in err


def test_meta_train_that_diverges_stops_with_the_reason_and_writes_nothing(tmp_path, capsys):
    # It used to write a checkpoint of NaN weights, report success, and leave the error to the daemon's start.
    import math
    csv = tmp_path / "pump.csv"
    csv.write_text("timestamp,value\n" + "\n".join(f"{1700000000 + 60 * t},{math.sin(t / 5):.4f}" for t in range(120)))
    out = tmp_path / "init.pt"
    assert main(["meta-train", "--data", str(csv), "--out", str(out), "--algorithm", "fomaml", "--iterations", "5",
                 "--tasks-per-batch", "2", "--warmup", "32", "--query", "16", "--inner-steps", "2", "--hidden", "4",
                 "--inner-lr", "1e30", "--quiet"]) == 2
    assert "meta-training diverged at iteration 1" in capsys.readouterr().err
    assert not out.exists()


def test_meta_train_on_series_that_move_only_at_their_end_is_refused_not_a_hang(tmp_path, capsys):
    csv = tmp_path / "flat.csv"
    csv.write_text("timestamp,value\n" + "\n".join(f"{1700000000 + 60 * t},{1.0 if t == 119 else 0.0}"
                                                 for t in range(120)))
    assert main(["meta-train", "--data", str(csv), "--out", str(tmp_path / "init.pt"), "--iterations", "1",
                 "--tasks-per-batch", "2", "--warmup", "32", "--query", "16", "--hidden", "4", "--quiet"]) == 2
    assert "no series has a window of 32 values that is not flat" in capsys.readouterr().err


def test_a_user_s_mistakes_on_the_command_line_are_named_not_given_as_an_errno(tmp_path, capsys, monkeypatch):
    """Each is an exit 2 with a line that names the option and what is wrong, before any work."""
    import sys

    recording = tmp_path / "pump.csv"
    recording.write_text("timestamp,value\n" + "".join(f"2024-01-01 00:{m:02d}:00,{m % 7}\n" for m in range(40)))
    cases = [
        (["replay", str(recording), "--out", str(tmp_path / "nowhere" / "x.csv")],
         f"--out {tmp_path}/nowhere/x.csv: no folder {tmp_path}/nowhere to write it in"),
        (["replay", str(recording), "--dead-letter", str(tmp_path)], f"--dead-letter {tmp_path}: is a directory"),
        (["replay", str(recording), "--warmup", "20000"], "--warmup must be in 16..16384, got 20000"),
        (["demo", "--warmup", "8"], "--warmup must be in 16..16384, got 8"),  # not detector.warmup
        (["config", "--config", str(tmp_path)], f"{tmp_path}: is a directory, not a configuration file"),
        (["evaluate", "--dataset", "nab", "--data", str(tmp_path)], "NAB's labelled windows not found at "),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    for argv, message in ((["--warmup", "8"], "argument --warmup: must be >= 16, got 8"),
                          (["--query", "1"], "argument --query: must be >= 2, got 1"),
                          (["--inner-steps", "-3"], "argument --inner-steps: must be in 0..1000, got -3"),
                          (["--reptile-step", "2"], "argument --reptile-step: must be in (0, 1], got 2.0")):
        with pytest.raises(SystemExit) as exit_:  # as argparse refuses: not MetaConfig's internal names
            main(["meta-train", "--data", str(recording), "--out", str(tmp_path / "i.pt"), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pump.csv"]  # nothing written
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: refused before the scoring
    assert main(["evaluate", "--dataset", "nab", "--data", str(tmp_path), "--report", str(tmp_path / "r")]) == 2
    assert "--report draws its figures with matplotlib, which is not installed" in capsys.readouterr().err


def test_bootstrap_servers_are_taken_in_every_form_kafka_python_reads():
    from monitor.config import Config
    servers = "[::1]:9092,SSL://broker-1.example.com:9093,broker-2,10.0.0.7:19092"
    assert Config.load(environ={"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": servers}).kafka.bootstrap_servers == servers


def test_an_unreachable_broker_is_named_as_the_setting_to_check(capsys, monkeypatch):
    from kafka.errors import KafkaTimeoutError

    import monitor.cli as cli

    def unreachable(args):
        raise KafkaTimeoutError("Unable to bootstrap from ['localhost:9']")
    monkeypatch.setattr(cli, "cmd_config", unreachable)
    assert main(["config"]) == 2
    assert "no broker answered at the addresses given: kafka.bootstrap_servers" in capsys.readouterr().err


def test_a_dash_replays_standard_input(tmp_path):
    import subprocess
    import sys

    lines = "".join(f'{{"device": "p1", "ts": {t}, "value": {t % 5}.5}}\n' for t in range(40))
    out = tmp_path / "scores.csv"
    done = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", "-", "--format", "jsonl", "--warmup",
                           "16", "--out", str(out)], input=lines, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 41  # a header and every reading


def test_evaluate_and_meta_train_refuse_what_would_fail_late_or_lose_data(tmp_path, capsys):
    """Each was found only after minutes of scoring, or not at all (the checkpoint written over
    the recording it was trained on)."""
    recording = tmp_path / "pump.csv"
    text = "timestamp,value\n" + "".join(f"{1_700_000_000 + 60 * t},{math.sin(t / 7)}\n" for t in range(600))
    recording.write_text(text)
    assert main(["meta-train", "--data", str(recording), "--out", str(recording), "--quiet"]) == 2
    assert "is one of the recordings trained on" in capsys.readouterr().err and recording.read_text() == text
    # no window of 32 fits a warm-up of 16 to 31: --warmup 16 was refused, naming none of the options
    assert main(["meta-train", "--data", str(recording), "--out", str(tmp_path / "i.pt"), "--warmup", "16",
                 "--query", "8", "--iterations", "2", "--hidden", "4", "--quiet"]) == 0
    labels = tmp_path / "nab" / "labels"
    labels.mkdir(parents=True)
    for content in ("{}", "5", "{x"):
        (labels / "combined_windows.json").write_text(content)
        assert main(["evaluate", "--dataset", "nab", "--data", str(tmp_path), "--detectors", "zscore", "--quiet"]) == 2
        assert "combined_windows.json: " in capsys.readouterr().err, content
    assert main(["evaluate", "--dataset", "nab", "--data", str(tmp_path), "--report", str(recording / "r"),
                 "--quiet"]) == 2
    assert f"--report {recording}/r: {recording} is not a folder" in capsys.readouterr().err


def test_replay_to_kafka_checks_its_bootstrap_servers_as_the_setting_is_checked(tmp_path, capsys):
    """'a b:1' was handed to kafka-python, which tried it for 30 s and said less."""
    from monitor.cli import main
    recording = tmp_path / "r.jsonl"
    recording.write_text('{"device": "a", "ts": 1, "value": 1.0}\n')
    for given, said in (("a b:1", "--bootstrap-servers: 'a b:1' is not host:port"),
                        ("b:1,", "--bootstrap-servers must be a comma-separated host:port list with no empty entry")):
        assert main(["replay-to-kafka", str(recording), "--topic", "t", "--bootstrap-servers", given]) == 2
        assert said in capsys.readouterr().err


def test_ctrl_c_while_torch_loads_ends_the_command_quietly():
    """The ``forewarn`` command's entry point, interrupted while it imports the CLI (torch takes
    a second or more): it printed a KeyboardInterrupt traceback from inside the imports."""
    import signal
    import subprocess
    import sys
    from pathlib import Path
    child = """
import os, signal, sys, time
class InterruptTheImport:  # Ctrl-C exactly while monitor.cli (and torch with it) is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "monitor.cli":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        return None
from monitor.entry import main
sys.meta_path.insert(0, InterruptTheImport())
main(["config", "--print"])
"""
    done = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGINT  # the shell's 130
    assert "Traceback" not in done.stderr and done.stdout == ""
