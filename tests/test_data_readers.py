"""Dataset readers on tiny fixtures in the exact public file formats (tests/fixtures/datasets/)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from vidseek.data import DATASET_FORMATS, RetrievalDataset, VideoRecord, detect_format, load_dataset
from vidseek.data.lsmdc import movie_of_clip
from vidseek.data.records import holdout_ids
from vidseek.errors import ConfigError, DatasetError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

# MSVD's raw-captions.pkl holds token lists; written by the tests (a pickle is opaque in review).
MSVD_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "man", "is", "playing", "a", "flute"], ["someone", "plays", "a", "flute"]],
    "bQJQGoJF7_k_162_169": [["a", "cat", "is", "eating"]],
    "0lh_UWF9ZP4_62_69": [["a", "woman", "is", "slicing", "an", "onion"], ["a", "lady", "cuts", "onions"]],
    "zzit5b_-ukg_5_20": [["a", "panda", "climbs", "a", "tree"]],
}


def dataset_copy(name: str, tmp_path: Path) -> Path:
    """A writable copy of one fixture dataset (tests add video files and break annotations)."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    if name == "msvd":
        with open(root / "raw-captions.pkl", "wb") as fh:
            pickle.dump(MSVD_CAPTIONS, fh, protocol=2)
    return root


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def ids(dataset: RetrievalDataset) -> list[str]:
    return [record.video_id for record in dataset.records]


# --- generic JSONL ------------------------------------------------------------------------------

def test_jsonl_reads_every_split_with_paths_times_and_meta(tmp_path):
    root = dataset_copy("jsonl", tmp_path)
    touch(root / "videos" / "clip000.mp4")
    train = load_dataset(root, "train")
    assert (train.name, train.split, train.protocol, train.root) == ("jsonl", "train", "multi", root)
    assert train.records[0] == VideoRecord(
        "clip000", root / "videos" / "clip000.mp4",
        ("a red circle moves left", "a small red circle slides to the left"), "train",
        meta={"hard_negatives": ["clip001"]},
    )
    assert train.records[1] == VideoRecord("clip001", root / "videos" / "clip001.mp4",
                                           ("a red circle moves right",), "train")
    assert train.queries() == [("a red circle moves left", 0), ("a small red circle slides to the left", 0),
                               ("a red circle moves right", 1)]
    assert [r.video_id for r in train.missing_videos()] == ["clip001"]

    test = load_dataset(root, "test")
    assert ids(test) == ["clip002", "clip003"]
    assert [(r.start, r.end) for r in test.records] == [(2.5, 7.0), (7.0, 11.5)]
    assert test.records[0].path == test.records[1].path == root / "videos" / "long.mp4"
    assert ids(load_dataset(root, "val")) == ["clip004"]


def test_jsonl_single_protocol_and_file_root_with_absolute_paths(tmp_path):
    root = dataset_copy("jsonl", tmp_path)
    single = load_dataset(root, "test", protocol="single")
    assert single.queries() == [("a blue square grows then blinks", 0), ("a blue square blinks then grows", 1)]
    # Training pairs are every caption whatever the evaluation protocol.
    assert len(single.training_pairs()) == 3

    other = tmp_path / "elsewhere" / "mine.jsonl"
    other.parent.mkdir()
    absolute = tmp_path / "media" / "x.mp4"
    other.write_text(
        '{"video_id": "x", "video": "%s", "captions": ["an absolute path"], "split": "test"}\n' % absolute
    )
    assert detect_format(other) == "jsonl"
    dataset = load_dataset(other, "test")
    assert dataset.records[0].path == absolute
    assert dataset.root == other.parent


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"video_id": "a", "video": "a.mp4", "captions": ["x"], "split": "train"', "line 2: malformed JSON"),
        ('{"video_id": "a", "captions": ["x"], "split": "train"}', "line 2: field 'video' must be a non-empty string"),
        ('{"video_id": "a", "video": "a.mp4", "captions": [], "split": "train"}', "line 2: field 'captions'"),
        ('{"video_id": "a", "video": "a.mp4", "captions": ["x"], "split": "dev"}', "split 'dev' is not one of train, val, test"),
        ('{"video_id": "a", "video": "a.mp4", "captions": ["x"], "split": "train", "start": 5, "end": 2}', "'end' (2.0) must be after 'start' (5.0)"),
        ('{"video_id": "ok", "video": "a.mp4", "captions": ["x"], "split": "train"}', "video_id 'ok' already used on line 1"),
        ('[1, 2]', "line 2: expected a JSON object, found list"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "annotations.jsonl"
    path.write_text('{"video_id": "ok", "video": "ok.mp4", "captions": ["fine"], "split": "train"}\n' + line + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "train", fmt="jsonl")
    assert str(err.value).startswith(f"{path}: line 2")
    assert message in str(err.value)


def test_jsonl_missing_file_empty_split_and_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match=r"annotations.jsonl not found in .*: write one JSON object per line"):
        load_dataset(tmp_path, "train", fmt="jsonl")
    root = dataset_copy("jsonl", tmp_path)
    (root / "annotations.jsonl").write_text(
        '{"video_id": "a", "video": "a.mp4", "captions": ["x"], "split": "test"}\n'
    )
    with pytest.raises(DatasetError, match=r"has no videos in split 'val' \(splits present: test\)"):
        load_dataset(root, "val")
    with pytest.raises(DatasetError, match="unknown split 'dev' for jsonl: valid splits are train, val, test"):
        load_dataset(root, "dev")


# --- MSR-VTT ------------------------------------------------------------------------------------

def test_msrvtt_9k_train_and_val_hold_out(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    touch(root / "videos" / "all" / "video0.mp4")
    touch(root / "videos" / "all" / "video1.webm")  # some releases ship .webm
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("msrvtt", "multi")
    # video3 is the 5 % hold-out (ceil(0.05 * 4) = 1 video, the smallest BLAKE2b hash).
    assert ids(train) == ["video0", "video1", "video2"]
    assert [r.captions for r in train.records] == [
        ("a car is shown", "a red car drives down a road"),
        ("a woman is talking to the camera",),
        ("a man plays a guitar",),
    ]
    assert train.records[0].meta == {"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo"}
    assert train.records[0].path == root / "videos" / "all" / "video0.mp4"
    assert train.records[1].path == root / "videos" / "all" / "video1.webm"
    assert train.records[2].path == root / "videos" / "all" / "video2.mp4"
    assert [r.video_id for r in train.missing_videos()] == ["video2"]
    assert train.training_pairs() == [("a car is shown", 0), ("a red car drives down a road", 0),
                                      ("a woman is talking to the camera", 1), ("a man plays a guitar", 2)]

    val = load_dataset(root, "val")
    assert ids(val) == ["video3"]
    assert val.queries() == [("a person is cooking in a kitchen", 0), ("someone stirs a pot", 0)]

    train_7k = load_dataset(root, "train", train_split="7k")
    assert ids(train_7k) == ["video0"]
    assert ids(load_dataset(root, "val", train_split="7k")) == ["video3"]


def test_msrvtt_test_1k_a_and_full(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    test = load_dataset(root, "test")
    assert (test.protocol, ids(test)) == ("single", ["video7", "video9"])
    # The JSFusion sentence leads; the other MSR-VTT captions follow without duplicates.
    assert test.records[0].captions == ("a brown dog chases a ball", "a dog runs in a park")
    assert test.records[1].captions == ("a news anchor reads, then smiles", "a tv news program")
    assert test.queries() == [("a brown dog chases a ball", 0), ("a news anchor reads, then smiles", 1)]

    full = load_dataset(root, "test", test_split="full")
    assert (full.protocol, ids(full)) == ("multi", ["video7", "video8", "video9"])
    assert full.queries() == [
        ("a dog runs in a park", 0), ("a brown dog chases a ball", 0), ("kids play football", 1),
        ("a news anchor reads, then smiles", 2), ("a tv news program", 2),
    ]


def test_msrvtt_alternative_video_folder_and_override(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    touch(root / "MSRVTT_Videos" / "video7.mp4")
    assert load_dataset(root, "test").records[0].path == root / "MSRVTT_Videos" / "video7.mp4"
    touch(tmp_path / "elsewhere" / "video9.mp4")
    moved = load_dataset(root, "test", video_dir=tmp_path / "elsewhere")
    assert [r.path for r in moved.records] == [tmp_path / "elsewhere" / "video7.mp4", tmp_path / "elsewhere" / "video9.mp4"]
    assert [r.video_id for r in moved.missing_videos()] == ["video7"]
    with pytest.raises(DatasetError, match="video folder .*nowhere does not exist"):
        load_dataset(root, "test", video_dir="nowhere")


def test_msrvtt_errors(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    with pytest.raises(ConfigError, match="unknown test_split '1k-B' for msrvtt: use one of 1k-A, full"):
        load_dataset(root, "test", test_split="1k-B")
    with pytest.raises(ConfigError, match="unknown option.*max_words for dataset format msrvtt"):
        load_dataset(root, "test", max_words=32)

    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id\nret0,msr7,video7\n")
    with pytest.raises(DatasetError, match="MSRVTT_JSFUSION_test.csv has no 'sentence' column"):
        load_dataset(root, "test")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr7,video7,a dog\nret1,msr9,,x\n")
    with pytest.raises(DatasetError, match="MSRVTT_JSFUSION_test.csv: line 3: empty or missing video_id"):
        load_dataset(root, "test")

    (root / "MSRVTT_data.json").write_text('{"videos": [],\n "sentences": [\n {"caption": "x" "video_id": "v"}]}')
    with pytest.raises(DatasetError, match=r"malformed JSON in .*MSRVTT_data.json at line 3, column 18"):
        load_dataset(root, "train", fmt="msrvtt")
    (root / "MSRVTT_data.json").write_text('{"videos": [], "sentences": [{"video_id": "video0"}]}')
    with pytest.raises(DatasetError, match=r"sentences\[0\] needs a non-empty string 'caption'"):
        load_dataset(root, "train", fmt="msrvtt")
    (root / "MSRVTT_data.json").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(root, "train", fmt="msrvtt")
    assert str(err.value) == (
        f"MSRVTT_data.json not found in {root}: download the MSR-VTT annotations (CLIP4Clip's msrvtt_data.zip, "
        "github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip) into that folder"
    )


def test_msrvtt_train_video_without_captions_is_an_error(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\nvideo3\nvideo42\n")
    with pytest.raises(DatasetError, match="video video42 listed in MSRVTT_train.9k.csv has no captions"):
        load_dataset(root, "train")


# --- DiDeMo -------------------------------------------------------------------------------------

def test_didemo_paragraphs_in_time_order_with_moments(tmp_path):
    root = dataset_copy("didemo", tmp_path)
    # Re-encoded download: the annotation says .mov, the file is .mp4 (found by stem).
    touch(root / "videos" / "14224838@N04_4087556946_0b7cbfb6f2.mp4")
    touch(root / "videos" / "part2" / "21981919@N00_2495391371_23f5a9e5b2.mp4")
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("didemo", "paragraph")
    assert ids(train) == ["14224838@N04_4087556946_0b7cbfb6f2.mov", "21981919@N00_2495391371_23f5a9e5b2.mp4"]
    first = train.records[0]
    assert first.captions == ("the camera pans over the lake", "a dog jumps into the water")
    # lake: chunks [[0,0],[0,1],[0,0],[0,0]] -> 0 s .. (0.25 + 1) * 5 s; dog: 2.25 * 5 .. 3.75 * 5
    assert first.meta == {"moments": [(0.0, 6.25), (11.25, 18.75)]}
    assert (first.start, first.end) == (None, None)
    assert first.path == root / "videos" / "14224838@N04_4087556946_0b7cbfb6f2.mp4"
    assert train.records[1].path == root / "videos" / "part2" / "21981919@N00_2495391371_23f5a9e5b2.mp4"
    assert train.queries() == [
        ("the camera pans over the lake a dog jumps into the water", 0),
        ("a child blows out candles", 1),
    ]
    assert train.training_pairs() == train.queries()
    assert train.missing_videos() == []

    in_file_order = load_dataset(root, "train", sentence_order="file")
    assert in_file_order.records[0].captions == ("a dog jumps into the water", "the camera pans over the lake")


def test_didemo_split_list_filters_and_missing_videos(tmp_path):
    root = dataset_copy("didemo", tmp_path)
    test = load_dataset(root, "test")
    # test_list.txt keeps two of the three annotated videos, in list order.
    assert ids(test) == ["10016148@N04_8311237834_65ea55f0ee.mov", "97795522@N00_3291842517_9f9e8d7c6b.3gp"]
    assert test.queries() == [("a band plays on stage people start dancing", 0), ("a man waves at the camera", 1)]
    assert test.records[1].path == root / "videos" / "97795522@N00_3291842517_9f9e8d7c6b.3gp"
    assert len(test.missing_videos()) == 2
    val = load_dataset(root, "val")  # no val_list.txt: every annotated video
    assert ids(val) == ["41112334@N00_5532210987_aa11bb22cc.avi"]
    assert val.records[0].meta == {"moments": [(21.25, 28.75)]}

    (root / "test_list.txt").write_text("10016148@N04_8311237834_65ea55f0ee.mov\nunknown_video.mov\n")
    with pytest.raises(DatasetError, match="test_list.txt lists 1 video.*first: unknown_video.mov"):
        load_dataset(root, "test")
    (root / "train_data.json").write_text('[{"video": "a.mov", "description": "x", "times": [[0]]}]')
    with pytest.raises(DatasetError, match=r"train_data.json: item 0 'times' must be a non-empty list"):
        load_dataset(root, "train")
    (root / "val_data.json").unlink()
    with pytest.raises(DatasetError, match=r"val_data.json not found in .*LocalizingMoments"):
        load_dataset(root, "val")


# --- VATEX --------------------------------------------------------------------------------------

def test_vatex_splits_and_every_caption_is_a_query(tmp_path):
    root = dataset_copy("vatex", tmp_path)
    touch(root / "videos" / "Ptf_2VRj-V0_000122_000132.mkv")
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("vatex", "multi")
    assert ids(train) == ["Ptf_2VRj-V0_000122_000132", "-0C6BOcr3J8_000005_000015"]
    assert train.queries() == [
        ("A man is playing a guitar on a stage.", 0), ("A guitarist performs in front of a crowd.", 0),
        ("Two kids are jumping on a trampoline.", 1), ("Children bounce on a trampoline in a backyard.", 1),
        ("Kids play outside.", 1),
    ]
    assert train.records[0].path == root / "videos" / "Ptf_2VRj-V0_000122_000132.mkv"
    assert train.records[1].path == root / "videos" / "-0C6BOcr3J8_000005_000015.mp4"
    assert ids(load_dataset(root, "val")) == ["zyx1WV8dC2E_000030_000040"]
    test = load_dataset(root, "test")
    assert test.records[0].captions == ("A dog swims in a pool.", "A puppy paddles across the water.")

    (root / "val_list.txt").write_text("not_a_vatex_id\n")
    with pytest.raises(DatasetError, match="video not_a_vatex_id listed in val_list.txt has no captions in ref_captions.json"):
        load_dataset(root, "val")
    (root / "test_list.txt").unlink()
    with pytest.raises(DatasetError, match="test_list.txt not found in .*: download the VATEX retrieval annotations"):
        load_dataset(root, "test")


# --- MSVD ---------------------------------------------------------------------------------------

def test_msvd_token_captions_joined_and_avi_lookup(tmp_path):
    root = dataset_copy("msvd", tmp_path)
    touch(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("msvd", "multi")
    assert ids(train) == ["-4wsuPCjDBc_5_15", "bQJQGoJF7_k_162_169"]
    assert train.queries() == [("a man is playing a flute", 0), ("someone plays a flute", 0), ("a cat is eating", 1)]
    assert train.records[0].path == root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi"
    assert train.records[1].path == root / "YouTubeClips" / "bQJQGoJF7_k_162_169.avi"
    assert load_dataset(root, "val").queries() == [("a woman is slicing an onion", 0), ("a lady cuts onions", 0)]
    assert load_dataset(root, "test").queries() == [("a panda climbs a tree", 0)]


def test_msvd_refuses_pickles_that_reference_code(tmp_path):
    root = dataset_copy("msvd", tmp_path)

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(root / "raw-captions.pkl", "wb") as fh:
        pickle.dump({"-4wsuPCjDBc_5_15": RunsCode()}, fh)
    with pytest.raises(DatasetError, match="raw-captions.pkl is not a readable caption pickle .*refusing to load posix.getcwd"):
        load_dataset(root, "train")
    (root / "raw-captions.pkl").unlink()
    with pytest.raises(DatasetError, match="raw-captions.pkl not found in .*msvd_data.zip"):
        load_dataset(root, "train", fmt="msvd")


# --- LSMDC --------------------------------------------------------------------------------------

def test_lsmdc_groups_sentences_per_clip_under_movie_folders(tmp_path):
    root = dataset_copy("lsmdc", tmp_path)
    clip = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    touch(root / "avi" / "0001_American_Beauty" / f"{clip}.avi")
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("lsmdc", "multi")
    assert ids(train) == [clip, "0002_As_Good_As_It_Gets_00.01.05.000-00.01.07.500"]
    assert train.records[0].captions == ("SOMEONE sits at a desk.", "He stares at the screen.")
    assert train.records[0].meta == {
        "movie": "0001_American_Beauty", "start_aligned": "00.00.51.926", "end_aligned": "00.00.54.129",
        "start_extracted": "00.00.51.000", "end_extracted": "00.00.55.000",
    }
    assert train.records[0].path == root / "avi" / "0001_American_Beauty" / f"{clip}.avi"
    assert train.records[1].path == (
        root / "avi" / "0002_As_Good_As_It_Gets" / "0002_As_Good_As_It_Gets_00.01.05.000-00.01.07.500.avi"
    )
    assert len(train.queries()) == 3
    assert ids(load_dataset(root, "val")) == ["1004_Juno_00.00.32.849-00.00.35.458"]
    test = load_dataset(root, "test")
    assert test.queries() == [('SOMEONE and SOMEONE stand at the bow, "flying".', 0),
                              ("A train speeds through the night.", 1)]
    assert movie_of_clip("1010_TITANIC_00.41.32.072-00.41.40.196") == "1010_TITANIC"


def test_lsmdc_malformed_line_and_missing_file(tmp_path):
    root = dataset_copy("lsmdc", tmp_path)
    path = root / "LSMDC16_annos_val.csv"
    path.write_text(path.read_text() + "1004_Juno_00.00.40.000-00.00.42.000\t00.00.40.000\tonly three fields\n")
    with pytest.raises(DatasetError, match=r"LSMDC16_annos_val.csv: line 2: expected 6 tab-separated fields .*found 3"):
        load_dataset(root, "val")
    (root / "LSMDC16_challenge_1000_publictect.csv").unlink()
    with pytest.raises(DatasetError, match="LSMDC16_challenge_1000_publictect.csv not found in .*MPII Movie Description"):
        load_dataset(root, "test")


# --- ActivityNet Captions -----------------------------------------------------------------------

def test_activitynet_paragraphs_hold_out_and_test_is_val_1(tmp_path):
    root = dataset_copy("activitynet", tmp_path)
    touch(root / "videos" / "QOlSCBRmfWY.mp4")
    touch(root / "videos" / "v_ehGHCYKzyZ8.mkv")
    train = load_dataset(root, "train")
    assert (train.name, train.protocol) == ("activitynet", "paragraph")
    # v_nwznKOuZM7w is the validation hold-out (ceil(0.05 * 4) = 1 video).
    assert ids(train) == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8", "v_ogQozSI5V8U"]
    assert train.records[1].captions == ("A man is seen speaking to the camera.",
                                         "The man then holds up the violin and plays.")
    assert train.records[1].meta == {"duration": 61.72, "timestamps": [(0.0, 18.24), (17.1, 61.72)]}
    assert train.records[0].path == root / "videos" / "QOlSCBRmfWY.mp4"
    assert train.records[1].path == root / "videos" / "v_ehGHCYKzyZ8.mkv"
    assert train.records[2].path == root / "videos" / "ogQozSI5V8U.mp4"
    assert train.queries()[1] == (
        "A man is seen speaking to the camera. The man then holds up the violin and plays.", 1
    )
    assert train.queries()[0][0] == (
        "A young woman is seen standing in a room and leads into her dancing. The girl dances around "
        "the room while the camera captures her movements. She continues dancing around the room and "
        "ends by laying on the floor."
    )
    assert ids(load_dataset(root, "val")) == ["v_nwznKOuZM7w"]
    test = load_dataset(root, "test")
    assert ids(test) == ["v_uqiMw7tQ1Cc", "v_bXdq2zI1Ms0"]
    assert test.queries()[0] == (
        "A weight lifting tutorial is given. The coach helps the guy in red with the proper body "
        "placement and lifting technique.", 0
    )

    (root / "val_1.json").write_text('{"v_x": {"duration": 10, "timestamps": [[0, 5]], "sentences": ["a", "b"]}}')
    with pytest.raises(DatasetError, match=r"val_1.json: video 'v_x' 'timestamps' must hold one \[start, end\] pair per sentence"):
        load_dataset(root, "test")
    (root / "train.json").unlink()
    with pytest.raises(DatasetError, match="train.json not found in .*ActivityNet Captions annotations"):
        load_dataset(root, "train", fmt="activitynet")


# --- detection, loader options, dataset operations ----------------------------------------------

@pytest.mark.parametrize("name", ["jsonl", "msrvtt", "didemo", "vatex", "msvd", "lsmdc", "activitynet"])
def test_detect_format_on_each_fixture(tmp_path, name):
    assert detect_format(dataset_copy(name, tmp_path)) == name


def test_every_format_has_a_fixture():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(DATASET_FORMATS)


def test_detect_format_prefers_jsonl_and_explains_an_empty_folder(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    shutil.copy(FIXTURES / "jsonl" / "annotations.jsonl", root / "annotations.jsonl")
    assert detect_format(root) == "jsonl"
    assert ids(load_dataset(root, "test", fmt="msrvtt")) == ["video7", "video9"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as err:
        detect_format(empty)
    message = str(err.value)
    assert message.startswith(f"no dataset annotations found in {empty}: expected one of jsonl: annotations.jsonl; ")
    for marker in ["MSRVTT_data.json", "train_data.json", "ref_captions.json", "raw-captions.pkl",
                   "LSMDC16_annos_training.csv", "val_1.json"]:
        assert marker in message
    with pytest.raises(DatasetError, match="dataset folder .*missing does not exist"):
        detect_format(tmp_path / "missing")


def test_loader_rejects_unknown_format_option_and_split(tmp_path):
    root = dataset_copy("vatex", tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset format 'youcook2': use one of jsonl, msrvtt"):
        load_dataset(root, "train", fmt="youcook2")
    with pytest.raises(ConfigError, match="unknown option.*protocol for dataset format vatex: accepted options are video_dir"):
        load_dataset(root, "train", protocol="single")
    with pytest.raises(DatasetError, match="unknown split 'validation' for vatex: valid splits are train, val, test"):
        load_dataset(root, "validation")


def test_subset_keeps_dataset_order_and_rejects_unknown_ids(tmp_path):
    full = load_dataset(dataset_copy("msrvtt", tmp_path), "test", test_split="full")
    part = full.subset(["video9", "video7"])
    assert ids(part) == ["video7", "video9"]
    assert (part.name, part.split, part.protocol, part.root) == (full.name, full.split, full.protocol, full.root)
    assert part.queries() == [("a dog runs in a park", 0), ("a brown dog chases a ball", 0),
                              ("a news anchor reads, then smiles", 1), ("a tv news program", 1)]
    with pytest.raises(DatasetError, match="1 requested video id.*not in msrvtt test: video99"):
        full.subset(["video7", "video99"])


def test_dataset_rejects_duplicate_ids_and_empty_captions(tmp_path):
    record = VideoRecord("a", tmp_path / "a.mp4", ("x",), "train")
    with pytest.raises(DatasetError, match="video id 'a' appears twice in mine train"):
        RetrievalDataset("mine", "train", "multi", [record, record], tmp_path)
    with pytest.raises(DatasetError, match="video 'b' in mine train has no captions"):
        RetrievalDataset("mine", "train", "multi", [VideoRecord("b", tmp_path / "b.mp4", (), "train")], tmp_path)
    with pytest.raises(ConfigError, match="unknown retrieval protocol 'pairs'"):
        RetrievalDataset("mine", "train", "pairs", [record], tmp_path)


def test_holdout_is_deterministic_sized_and_order_free():
    video_ids = [f"video{i}" for i in range(9000)]
    held = holdout_ids(video_ids, 0.05, salt="msrvtt-val")
    assert len(held) == 450
    assert holdout_ids(list(reversed(video_ids)), 0.05, salt="msrvtt-val") == held
    assert holdout_ids(video_ids, 0.05, salt="other") != held
    assert holdout_ids(["only"], 0.05, salt="x") == set()
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        holdout_ids(video_ids, 1.0, salt="x")


def test_file_roots_are_reported_as_files(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    with pytest.raises(DatasetError, match="MSRVTT_data.json is a file: pass the dataset folder that holds it"):
        load_dataset(root / "MSRVTT_data.json", "test")
    assert detect_format(tmp_path / "absent.jsonl") == "jsonl"
    with pytest.raises(DatasetError, match=f"absent.jsonl not found in {tmp_path}: write one JSON object per line"):
        load_dataset(tmp_path / "absent.jsonl", "test")


def test_byte_order_mark_is_ignored_and_non_utf8_is_reported(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    csv_path = root / "MSRVTT_train.9k.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # saved by a spreadsheet program
    assert ids(load_dataset(root, "train")) == ["video0", "video1", "video2"]
    lsmdc = dataset_copy("lsmdc", tmp_path)
    (lsmdc / "LSMDC16_annos_val.csv").write_bytes(b"clip\t1\t2\t3\t4\tcaf\xe9\n")
    with pytest.raises(DatasetError, match="LSMDC16_annos_val.csv is not UTF-8 text"):
        load_dataset(lsmdc, "val")


def test_malformed_csv_names_the_line(tmp_path):
    root = dataset_copy("msrvtt", tmp_path)
    (root / "MSRVTT_train.7k.csv").write_text('video_id\nvideo0\n"video3"x\n')
    with pytest.raises(DatasetError, match=r"MSRVTT_train.7k.csv: line 3: malformed CSV"):
        load_dataset(root, "train", train_split="7k")
