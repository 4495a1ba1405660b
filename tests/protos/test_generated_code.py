import pathlib
import shutil

from protos import generate


def test_committed_generated_code_is_current() -> None:
    assert generate.stale_files(generate.ROOT) == []


def test_stale_check_detects_an_edited_proto(tmp_path: pathlib.Path) -> None:
    shutil.copytree(generate.ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "common.proto"
    proto.write_text(
        proto.read_text().replace(
            "double max_delay_s = 2;", "double max_delay_s = 2;\n  int32 extra = 3;"
        )
    )

    stale = generate.stale_files(tmp_path)

    assert "common_pb2.py" in stale
