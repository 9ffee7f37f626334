"""Dataset readers: every source kind, class names, path resolution, error messages, unreadable images, link loops."""
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from modelscope_utuning.data import (PATH_KEY, ImageRowsDataset, UnreadableImageError, from_fgvc_json,
                                     from_hf_dataset, from_image_folder, from_manifest, from_msdataset, from_rows,
                                     from_vtab_list, load_dataset_any, read_class_names)
from modelscope_utuning.preprocessing.image_io import load_image

from colour_runs import write_folder


# -- helpers ---------------------------------------------------------------------------------------------------
def write_image(path, seed=0, fmt=None, size=8):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype('uint8')
    Image.fromarray(pixels).save(str(path), format=fmt)
    return str(path)


def write_truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype('uint8')).save(buffer, 'JPEG')
    data = buffer.getvalue()
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])  # the header survives, so PIL opens it and fails only on decoding
    return str(path)


def write_text(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return str(path)


def to_tensor(row):
    """A stand-in for the preprocessor: loads the image and maps the row to {'imgs', 'labels'}."""
    img = np.asarray(load_image(row).resize((4, 4)), dtype=np.float32) / 255.0
    return {'imgs': torch.from_numpy(img).permute(2, 0, 1), 'labels': torch.tensor(row['label'])}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def data_log():
    """Records of our logger (a child of ModelScope's, which does not propagate to pytest's caplog)."""
    handler = Records()
    log = logging.getLogger('modelscope.utuning.data')
    log.addHandler(handler)
    yield handler.records
    log.removeHandler(handler)


@pytest.fixture
def flowers(tmp_path):
    """An image folder: 3 classes, mixed-case extensions, hidden and non-image files, a nested folder."""
    root = tmp_path / 'flowers'
    write_image(root / 'tulip' / 'a.JPG', 1, 'JPEG')
    write_image(root / 'daisy' / 'b.png', 2)
    write_image(root / 'daisy' / 'c.Jpeg', 3, 'JPEG')
    write_image(root / 'rose' / 'sub' / 'd.PNG', 4, 'PNG')
    write_image(root / 'rose' / '.hidden.png', 5)
    write_image(root / '.cache' / 'e.png', 6)
    write_text(root / 'rose' / 'notes.txt', 'not an image')
    return root


# -- image folder ----------------------------------------------------------------------------------------------
def test_image_folder_classes_extensions_and_hidden_files(flowers):
    ds = from_image_folder(flowers)
    assert ds.classes == ['daisy', 'rose', 'tulip']
    got = sorted((os.path.relpath(r[PATH_KEY], flowers), r['label']) for r in (ds[i] for i in range(len(ds))))
    assert got == [('daisy/b.png', 0), ('daisy/c.Jpeg', 0), ('rose/sub/d.PNG', 1), ('tulip/a.JPG', 2)]
    assert all(os.path.isabs(ds[i][PATH_KEY]) for i in range(len(ds)))
    assert ds.num_classes == 3 and sorted(ds.labels) == [0, 0, 1, 2]


def test_image_folder_explicit_class_order(flowers):
    ds = from_image_folder(flowers, classes=['tulip', 'rose', 'daisy', 'lily'])
    assert ds.classes == ['tulip', 'rose', 'daisy', 'lily']
    assert {os.path.basename(ds[i][PATH_KEY]): ds[i]['label'] for i in range(len(ds))}['a.JPG'] == 0
    with pytest.raises(ValueError, match='tulip'):
        from_image_folder(flowers, classes=['daisy', 'rose'])


def test_image_folder_empty_or_missing_names_root(tmp_path):
    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    write_text(tmp_path / 'empty' / 'cls' / 'readme.md', 'no images')
    with pytest.raises(ValueError, match=str(tmp_path / 'empty')):
        from_image_folder(tmp_path / 'empty')
    with pytest.raises(ValueError, match='nowhere'):
        from_image_folder(tmp_path / 'nowhere')


# -- manifests -------------------------------------------------------------------------------------------------
def test_csv_fme_columns_relative_paths_and_int_labels(tmp_path):
    write_image(tmp_path / 'data' / 'imgs' / 'a.png', 1)
    write_image(tmp_path / 'data' / 'imgs' / 'b.png', 2)
    manifest = write_text(tmp_path / 'data' / 'train.csv', 'img_path:FILE,label\nimgs/a.png,1\nimgs/b.png,0\n')
    ds = from_manifest(manifest)
    assert ds.classes is None and ds.num_classes == 2
    assert ds[0] == {PATH_KEY: str(tmp_path / 'data' / 'imgs' / 'a.png'), 'label': 1}
    assert ds[1]['label'] == 0


def test_csv_class_names_sorted_and_root(tmp_path):
    write_image(tmp_path / 'pics' / 'a.png', 1)
    manifest = write_text(tmp_path / 'lists' / 'm.csv',
                          'Filepath,Category\na.png,zebra\na.png,ant\na.png,zebra\n')
    ds = from_manifest(manifest, root=tmp_path / 'pics')
    assert ds.classes == ['ant', 'zebra']
    assert [ds[i]['label'] for i in range(3)] == [1, 0, 1]
    assert ds[0][PATH_KEY] == str(tmp_path / 'pics' / 'a.png')
    # Fixed classes keep train / val mappings identical even when a split lacks a class.
    ds = from_manifest(manifest, root=tmp_path / 'pics', classes=['zebra', 'bee', 'ant'])
    assert [ds[i]['label'] for i in range(3)] == [0, 2, 0]


@pytest.mark.parametrize('header', ['image,label', 'path,class', 'filepath,category', 'img_path:FILE,label'])
def test_csv_column_aliases(tmp_path, header):
    manifest = write_text(tmp_path / 'm.csv', f'{header}\nx.png,3\n')
    ds = from_manifest(manifest)
    assert ds[0] == {PATH_KEY: str(tmp_path / 'x.png'), 'label': 3}


def test_csv_errors_name_file_and_line(tmp_path):
    manifest = write_text(tmp_path / 'm.csv', 'path,label\na.png,0\nb.png,-2\n')
    with pytest.raises(ValueError, match=r'm\.csv:3: label -2 is negative'):
        from_manifest(manifest)
    manifest = write_text(tmp_path / 'n.csv', 'path,label\na.png,0\nb.png,5\n')
    with pytest.raises(ValueError, match=r'n\.csv:3: label 5 is not in \[0, 2\)'):
        from_manifest(manifest, classes=['x', 'y'])
    manifest = write_text(tmp_path / 'o.csv', 'path,label\na.png,cat\nb.png,1\n')
    with pytest.raises(ValueError, match=r"o\.csv:3: label '1' is not a class name.*o\.csv:2"):
        from_manifest(manifest)
    manifest = write_text(tmp_path / 'p.csv', 'name,label\na.png,0\n')
    with pytest.raises(ValueError, match=r"p\.csv:1: header \['name', 'label'\] has no image path column"):
        from_manifest(manifest)
    manifest = write_text(tmp_path / 'q.csv', 'path,score\na.png,0\n')
    with pytest.raises(ValueError, match=r'q\.csv:1: .*no label column'):
        from_manifest(manifest)
    manifest = write_text(tmp_path / 'r.csv', 'path,label\na.png,0\n,1\n')
    with pytest.raises(ValueError, match=r'r\.csv:3: image path must be a non-empty string'):
        from_manifest(manifest)
    manifest = write_text(tmp_path / 's.csv', 'path,label\na.png,dog\n')
    with pytest.raises(ValueError, match=r"s\.csv:2: unknown class name 'dog'"):
        from_manifest(manifest, classes=['cat'])


def test_jsonl_manifest(tmp_path):
    write_image(tmp_path / 'a.png', 1)
    manifest = write_text(tmp_path / 'm.jsonl',
                          '{"image": "a.png", "label": "daisy"}\n\n{"image": "a.png", "label": "rose"}\n')
    ds = from_manifest(manifest)
    assert ds.classes == ['daisy', 'rose'] and [ds[0]['label'], ds[1]['label']] == [0, 1]
    assert ds[1][PATH_KEY] == str(tmp_path / 'a.png')
    bad = write_text(tmp_path / 'bad.jsonl', '{"path": "a.png", "label": 0}\n{"path": "a.png"\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:2: invalid json'):
        from_manifest(bad)
    bad = write_text(tmp_path / 'bad2.jsonl', '{"path": "a.png", "label": 0}\n{"path": "a.png", "label": 1.5}\n')
    with pytest.raises(ValueError, match=r'bad2\.jsonl:2: label must be an int or a class name, got 1\.5'):
        from_manifest(bad)
    bad = write_text(tmp_path / 'bad3.jsonl', '{"file_name": "a.png", "label": 0}\n')
    with pytest.raises(ValueError, match=r'bad3\.jsonl:1: missing an image path key'):
        from_manifest(bad)


# -- VTAB-1K and FGVC ------------------------------------------------------------------------------------------
def test_vtab_list_splits_on_last_whitespace(tmp_path):
    vtab = tmp_path / 'vtab-1k' / 'caltech101'
    write_image(vtab / 'images' / 'my dir' / 'a b.jpg', 1, 'JPEG')
    write_image(vtab / 'images' / 'c.jpg', 2, 'JPEG')
    lst = write_text(vtab / 'train800val200.txt', 'images/my dir/a b.jpg 3\n\nimages/c.jpg\t0\r\n')
    ds = from_vtab_list(lst)
    assert ds[0] == {PATH_KEY: str(vtab / 'images' / 'my dir' / 'a b.jpg'), 'label': 3}
    assert ds[1] == {PATH_KEY: str(vtab / 'images' / 'c.jpg'), 'label': 0}
    assert ds.classes is None and ds.num_classes == 4
    assert from_vtab_list(lst, root=tmp_path)[1][PATH_KEY] == str(tmp_path / 'images' / 'c.jpg')
    bad = write_text(vtab / 'bad.txt', 'images/c.jpg 0\nimages/c.jpg\n')
    with pytest.raises(ValueError, match=r'bad\.txt:2: expected "<image path> <label>"'):
        from_vtab_list(bad)
    bad = write_text(vtab / 'neg.txt', 'images/c.jpg 0\nimages/c.jpg -1\n')
    with pytest.raises(ValueError, match=r'neg\.txt:2: label -1 is negative'):
        from_vtab_list(bad)


def test_fgvc_json_with_root_images_subfolder_and_class_names(tmp_path):
    cub = tmp_path / 'CUB_200_2011'
    write_image(cub / 'images' / '001.Albatross' / 'x.jpg', 1, 'JPEG')
    write_image(cub / 'images' / '002.Auklet' / 'y.jpg', 2, 'JPEG')
    split = write_text(cub / 'train.json', json.dumps({'001.Albatross/x.jpg': 0, '002.Auklet/y.jpg': 1}))
    ds = from_fgvc_json(split)  # the images/ sub-folder is found from the first key
    assert ds[0] == {PATH_KEY: str(cub / 'images' / '001.Albatross' / 'x.jpg'), 'label': 0}
    assert ds.classes is None
    assert from_fgvc_json(split, root=tmp_path)[1][PATH_KEY] == str(tmp_path / '002.Auklet' / 'y.jpg')
    # CUB's own classes.txt: "<number> <name>" lines.
    write_text(cub / 'classes.txt', '1 001.Albatross\n2 002.Auklet\n')
    assert from_fgvc_json(split).classes == ['001.Albatross', '002.Auklet']


def test_fgvc_json_inconsistent_class_file_is_ignored_and_bad_label_named(tmp_path, data_log):
    write_text(tmp_path / 'classes.txt', 'only_one\n')
    split = write_text(tmp_path / 'val.json', json.dumps({'a.jpg': 0, 'b.jpg': 1}))
    ds = from_fgvc_json(split)
    assert ds.classes is None and ds.num_classes == 2
    assert any('ignoring class names' in r.getMessage() for r in data_log)
    with pytest.raises(ValueError, match=r"val\.json \(key 'b\.jpg'\): label 1 is not in \[0, 1\)"):
        from_fgvc_json(split, classes=['only_one'])
    bad = write_text(tmp_path / 'test.json', json.dumps({'a.jpg': 0, 'b.jpg': None}))
    with pytest.raises(ValueError, match=r"test\.json \(key 'b\.jpg'\): label must be an int"):
        from_fgvc_json(bad)


def test_read_class_names_formats(tmp_path):
    assert read_class_names(write_text(tmp_path / 'a.txt', 'cat\ndog\n\n')) == ['cat', 'dog']
    assert read_class_names(write_text(tmp_path / 'b.json', '["x", "y"]')) == ['x', 'y']
    assert read_class_names(write_text(tmp_path / 'c.json', '{"y": 1, "x": 0}')) == ['x', 'y']
    assert read_class_names(write_text(tmp_path / 'd.json', '{"1": "y", "0": "x"}')) == ['x', 'y']


# -- Hugging Face and ModelScope -------------------------------------------------------------------------------
def hf_image_dataset(tmp_path, with_bad=False):
    import datasets
    images = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({'img': datasets.Image(), 'fine': datasets.ClassLabel(names=['a', 'b', 'c']),
                                  'note': datasets.Value('string')})
    ds = datasets.Dataset.from_dict({'img': images, 'fine': [0, 2, 1, 2], 'note': ['w', 'x', 'y', 'z']},
                                    features=features)
    if with_bad:
        # An image whose stored bytes are not an image: fails only when the row is decoded.
        bad = datasets.Dataset.from_dict({'img': [{'bytes': b'not an image', 'path': 'broken.png'}],
                                          'fine': [1], 'note': ['bad']}, features=features)
        ds = datasets.concatenate_datasets([ds.select([0]), bad, ds.select([1, 2, 3])])
    return ds


def test_hf_image_column_and_class_label(tmp_path):
    ds = from_hf_dataset(hf_image_dataset(tmp_path))
    assert ds.classes == ['a', 'b', 'c'] and ds.labels == [0, 2, 1, 2]
    row = ds[1]
    assert set(row) == {'image', 'label'} and row['label'] == 2
    assert isinstance(row['image'], Image.Image) and row['image'].getpixel((0, 0)) == (40, 40, 40)
    assert ds.validate() == []
    batch = next(iter(torch.utils.data.DataLoader(ds.with_transform(to_tensor), batch_size=4)))
    assert batch['imgs'].shape == (4, 3, 4, 4) and batch['labels'].tolist() == [0, 2, 1, 2]
    sub = ds.select([3, 0])
    assert sub.labels == [2, 0] and sub[0]['image'].getpixel((0, 0)) == (120, 120, 120)


def test_hf_int_label_and_path_columns(tmp_path):
    import datasets
    write_image(tmp_path / 'a.png', 1)
    ds = datasets.Dataset.from_dict({'image_path': ['a.png', 'a.png'], 'y': [1, 4]})
    got = from_hf_dataset(ds, root=tmp_path)
    assert got[1] == {PATH_KEY: str(tmp_path / 'a.png'), 'label': 4} and got.classes is None
    with pytest.raises(ValueError, match='label_column'):
        from_hf_dataset(datasets.Dataset.from_dict({'path': ['a.png'], 'y': [1], 'z': [2]}))
    got = from_hf_dataset(datasets.Dataset.from_dict({'path': ['a.png'], 'y': [1], 'z': [2]}), label_column='z')
    assert got[0]['label'] == 2


def test_hf_unreadable_image_raise_and_skip(tmp_path, data_log):
    hf = hf_image_dataset(tmp_path, with_bad=True)
    ds = from_hf_dataset(hf, transform=to_tensor)
    with pytest.raises(UnreadableImageError, match=r"'broken\.png' \(row 1 of "):
        ds[1]
    assert ds.validate() == ['broken.png']
    skipping = from_hf_dataset(hf, transform=to_tensor, on_error='skip')
    assert skipping[1]['labels'].item() == 2  # row 2 stands in for row 1
    assert skipping.skipped == ['broken.png']


def test_msdataset_wrapping_local_hf_dataset(tmp_path):
    import datasets
    from modelscope.msdatasets import MsDataset
    paths = [write_image(tmp_path / 'fme' / f'{i}.jpg', i, 'JPEG') for i in range(3)]
    features = datasets.Features({PATH_KEY: datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=['pink primrose', 'globe thistle'])})
    hf = datasets.Dataset.from_dict({PATH_KEY: paths, 'label': [1, 0, 1]}, features=features)
    ms = MsDataset.to_ms_dataset(hf)
    assert isinstance(ms, MsDataset)
    ds = from_msdataset(ms)
    assert ds.classes == ['pink primrose', 'globe thistle']
    assert ds[0] == {PATH_KEY: paths[0], 'label': 1}
    assert 'MsDataset' in ds.source
    assert load_dataset_any(ms).labels == [1, 0, 1]
    # Plain int labels, as the FME benchmark's csv gives them: no class names.
    plain = MsDataset(datasets.Dataset.from_dict({PATH_KEY: paths, 'label': [3, 0, 2]}))
    ds = from_msdataset(plain, transform=to_tensor)
    assert ds.classes is None and ds.num_classes == 4 and ds[2]['imgs'].shape == (3, 4, 4)
    # A DatasetDict becomes a dict of MsDatasets: split= picks one.
    splits = MsDataset.to_ms_dataset(datasets.DatasetDict({'train': hf, 'validation': hf.select([0])}))
    assert len(load_dataset_any(splits, split='val')) == 1
    with pytest.raises(ValueError, match='pass split='):
        load_dataset_any(splits)


def test_msdataset_row_lists_and_streaming_style_paths(tmp_path):
    path = write_image(tmp_path / 'x.png', 1)
    ds = from_msdataset([{PATH_KEY: path, 'label': 1}, {PATH_KEY: [path], 'label': 0}])
    assert ds[1] == {PATH_KEY: path, 'label': 0}
    with pytest.raises(ValueError, match='MsDataset rows row 0: missing a label key'):
        from_msdataset([{PATH_KEY: path}])


# -- unreadable images -----------------------------------------------------------------------------------------
@pytest.fixture
def with_bad_images(tmp_path):
    """Rows 0 and 3 readable; row 1 a truncated JPEG; row 2 a text file named .jpg; row 4 missing."""
    root = tmp_path / 'mixed'
    good0 = write_image(root / 'good0.png', 1)
    truncated = write_truncated_jpeg(root / 'truncated.jpg')
    not_image = write_text(root / 'not_image.jpg', 'hello, I am text')
    good3 = write_image(root / 'good3.png', 2)
    missing = str(root / 'missing.png')
    rows = [{PATH_KEY: p, 'label': i} for i, p in enumerate([good0, truncated, not_image, good3, missing])]
    return rows, (good0, truncated, not_image, good3, missing)


def test_unreadable_image_raises_naming_path_and_index(with_bad_images):
    rows, paths = with_bad_images
    ds = ImageRowsDataset(rows, transform=to_tensor)
    assert ds[0]['labels'].item() == 0
    for index in (1, 2, 4):
        with pytest.raises(ValueError) as info:
            ds[index]
        assert isinstance(info.value, UnreadableImageError)
        assert paths[index] in str(info.value) and f'row {index} ' in str(info.value)
        assert (info.value.path, info.value.index) == (paths[index], index)
    # Through a DataLoader too: the named error, not a bare collate error.
    with pytest.raises(ValueError, match='truncated'):
        list(torch.utils.data.DataLoader(ds, batch_size=2))


def test_skip_replaces_with_next_readable_and_warns_once(with_bad_images, data_log):
    rows, paths = with_bad_images
    ds = ImageRowsDataset(rows, transform=to_tensor, on_error='skip')
    got = [ds[i]['labels'].item() for i in range(len(ds))]
    assert got == [0, 3, 3, 3, 0]  # row 4 wraps around to row 0
    assert [ds[i]['labels'].item() for i in range(len(ds))] == got  # deterministic
    assert ds.skipped == [paths[1], paths[2], paths[4]]
    warnings = [r for r in data_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert paths[1] in warnings[0].getMessage() and '1 unreadable image(s) so far' in warnings[0].getMessage()
    batches = list(torch.utils.data.DataLoader(ds, batch_size=5))
    assert batches[0]['labels'].tolist() == [0, 3, 3, 3, 0]


def test_skip_without_transform_and_all_bad(with_bad_images):
    rows, paths = with_bad_images
    ds = ImageRowsDataset(rows, on_error='skip')
    assert ds[1] == rows[3] and ds[1] is not rows[3]  # a copy
    assert ImageRowsDataset(rows)[1] == rows[1]  # 'raise' without a transform decodes nothing
    with pytest.raises(ValueError, match='none of the 3 images is readable'):
        ImageRowsDataset([rows[1], rows[2], rows[4]], transform=to_tensor, on_error='skip')[0]


def test_transform_bug_is_not_blamed_on_the_image(with_bad_images):
    rows, _ = with_bad_images

    def broken(row):
        raise KeyError('imgs')

    with pytest.raises(KeyError):
        ImageRowsDataset(rows[:1], transform=broken)[0]
    with pytest.raises(KeyError):
        ImageRowsDataset(rows[:1], transform=broken, on_error='skip')[0]


def test_validate_lists_bad_paths_and_primes_skip(with_bad_images, data_log):
    rows, paths = with_bad_images
    assert ImageRowsDataset(rows).validate() == [paths[1], paths[2], paths[4]]
    assert ImageRowsDataset(rows).validate(num_workers=1) == [paths[1], paths[2], paths[4]]
    ds = ImageRowsDataset(rows, transform=to_tensor, on_error='skip')
    ds.validate()
    warnings = [r.getMessage() for r in data_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and '3 of 5 images are unreadable' in warnings[0]
    assert ds[2]['labels'].item() == 3


# -- rows, labels and dispatch ---------------------------------------------------------------------------------
def test_row_validation_and_on_error_argument(tmp_path):
    path = str(tmp_path / 'a.png')
    with pytest.raises(ValueError, match=r'row 1: label -1 is not in >= 0'):
        ImageRowsDataset([{PATH_KEY: path, 'label': 0}, {PATH_KEY: path, 'label': -1}])
    with pytest.raises(ValueError, match=r'row 0: label 2 is not in \[0, 2\)'):
        ImageRowsDataset([{PATH_KEY: path, 'label': 2}], classes=['a', 'b'])
    with pytest.raises(ValueError, match=r"row 0: label must be an int, got '1'"):
        ImageRowsDataset([{PATH_KEY: path, 'label': '1'}])
    with pytest.raises(ValueError, match='row 0 needs'):
        ImageRowsDataset([{'label': 0}])
    with pytest.raises(ValueError, match='on_error'):
        ImageRowsDataset([{PATH_KEY: path, 'label': 0}], on_error='ignore')
    ds = from_rows([{'image': Image.new('RGB', (3, 3)), 'label': 'cat'}, {'path': 'b.png', 'class': 'ant'}],
                   root=tmp_path)
    assert ds.classes == ['ant', 'cat'] and ds[1] == {PATH_KEY: str(tmp_path / 'b.png'), 'label': 0}
    assert ds[0]['image'].size == (3, 3)


def test_load_dataset_any_dispatch(tmp_path, flowers):
    import datasets
    assert load_dataset_any(flowers).classes == ['daisy', 'rose', 'tulip']
    # A dataset root with split sub-folders and split files.
    root = tmp_path / 'ds'
    write_image(root / 'train' / 'cat' / 'a.png', 1)
    write_image(root / 'train' / 'dog' / 'b.png', 2)
    write_text(root / 'train800val200.txt', 'train/cat/a.png 0\n')
    write_text(root / 'val.csv', 'path,label\ntrain/dog/b.png,1\n')
    write_text(root / 'test.json', json.dumps({'train/dog/b.png': 1}))
    assert load_dataset_any(root, split='train').classes == ['cat', 'dog']
    assert load_dataset_any(root / 'train800val200.txt')[0]['label'] == 0
    assert load_dataset_any(root, split='val')[0][PATH_KEY] == str(root / 'train' / 'dog' / 'b.png')
    assert load_dataset_any(root, split='test')[0]['label'] == 1
    with pytest.raises(ValueError, match="no split 'holdout'"):
        load_dataset_any(root, split='holdout')
    assert load_dataset_any(str(root / 'val.csv'), on_error='skip').on_error == 'skip'
    rows = load_dataset_any([{PATH_KEY: 'x.png', 'label': 0}])
    assert load_dataset_any(rows) is rows
    hf = hf_image_dataset(tmp_path)
    assert load_dataset_any(hf).classes == ['a', 'b', 'c']
    assert len(load_dataset_any(datasets.DatasetDict({'train': hf, 'test': hf.select([0])}), split='test')) == 1
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load_dataset_any(tmp_path / 'nowhere.csv')
    with pytest.raises(TypeError, match='cannot read a dataset from int'):
        load_dataset_any(3)


# -- link loops in an image folder (issue 11) --------------------------------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_a_link_loop_in_an_image_folder_reads_each_image_once_with_its_class(tmp_path):
    from modelscope_utuning.data import load_dataset_any
    data = write_folder(tmp_path / 'd', 'ab', n=3)
    os.symlink(data, os.path.join(data, 'a', 'loop'))  # back to the root: b's images would become a's
    os.symlink(os.path.join(data, 'a'), os.path.join(data, 'a', 'self'))
    ds = load_dataset_any(data)
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1]
    from modelscope_utuning.cli import expand_inputs
    assert len(expand_inputs([data])) == 6
