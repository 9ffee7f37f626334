"""The web demo (modelscope_utuning.deploy.app, ``modelscope-utuning serve``), tested as a person uses it: the server
runs on localhost, a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) opens the page,
uploads an image file and reads the labels and scores shown; they equal ``pipeline()``'s on the same file. Also: the
trained output folder carries an ``app.py`` that builds the demo on the folder itself, and a missing gradio is one
clear line."""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.pipelines import pipeline
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training.export import export_output

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1200,900')
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRI_TUNER = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
             {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3}]
CLASSES = ['bird', 'cat', 'dog', 'fish', 'frog', 'horse']  # more than 5: the page shows the top 5
OFFLINE_ENV = {'GRADIO_ANALYTICS_ENABLED': 'False', 'HF_HUB_OFFLINE': '1', 'NO_PROXY': '127.0.0.1,localhost'}

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """A trained-looking output folder, written by the trainer's export (so it carries app.py)."""
    cfg = {'framework': 'pytorch', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
           'model': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, tuners=TRI_TUNER),
                     'head': {'num_classes': len(CLASSES)}},
           'preprocessor': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'resize': 36}}
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(model_dir=None, backbone=cfg['model']['backbone'],
                                       head={'num_classes': len(CLASSES)}, CLASSES=list(CLASSES))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return export_output(model, cfg, str(tmp_path_factory.mktemp('output')))


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('upload') / 'upload me.png')
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_output_folder_carries_a_studio_app(model_dir, image, tmp_path):
    app_py = os.path.join(model_dir, 'app.py')
    source = open(app_py, encoding='utf-8').read()
    imported = {a.name.split('.')[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert imported == {'os', 'modelscope_utuning'}
    with open(os.path.join(model_dir, 'requirements.txt'), encoding='utf-8') as f:
        assert 'modelscope-utuning[gradio]' in f.read()
    with open(os.path.join(model_dir, 'README.md'), encoding='utf-8') as f:
        assert 'app.py' in f.read()

    # Imported from elsewhere, as Studio runs it: `demo` is the page for this folder and classifies like pipeline().
    code = textwrap.dedent(f'''
        import importlib.util, json
        spec = importlib.util.spec_from_file_location('studio_app', {app_py!r})
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        import gradio
        assert isinstance(app.demo, gradio.Blocks), type(app.demo)
        shown, table = app.demo.classify({image!r})
        print(json.dumps({{'shown': shown, 'table': table, 'title': app.demo.title}}))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = pipeline('vision-efficient-tuning', model_dir, device='cpu')(image)
    assert list(got['shown']) == expected['labels'] and len(expected['labels']) == 5
    np.testing.assert_allclose(list(got['shown'].values()), expected['scores'], atol=1e-6, rtol=0)
    assert 'id="utuning-scores"' in got['table'] and got['title'].endswith(os.path.basename(model_dir))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for_page(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f'the server exited ({proc.returncode}):\n{proc.stdout.read()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f'{url} did not answer within {timeout:.0f} s')


def _chromium(profile: str):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f'this test drives a real browser: {CHROMIUM} and {CHROMEDRIVER} are missing; install them with '
                    '`apt-get install -y chromium chromium-driver` (.ci/run does)')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f'--user-data-dir={profile}',):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'performance': 'ALL'})  # to list every request the page made
    # an explicit driver: Selenium Manager (which would look for drivers online) is not run
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(driver, css: str, timeout: float = 120.0):
    from selenium.webdriver.common.by import By
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f'{css!r} did not appear within {timeout:.0f} s')


def _requested_urls(driver):
    urls = []
    for entry in driver.get_log('performance'):
        message = json.loads(entry['message'])['message']
        if message.get('method') == 'Network.requestWillBeSent':
            urls.append(message['params']['request']['url'])
    return urls


def test_browser_upload_shows_the_pipelines_top5(model_dir, image, tmp_path):
    port = _free_port()
    url = f'http://127.0.0.1:{port}/'
    server = subprocess.Popen([sys.executable, '-m', 'modelscope_utuning', 'serve', model_dir, '--port', str(port),
                               '--device', 'cpu'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=str(tmp_path), env={**os.environ, **OFFLINE_ENV})
    driver = None
    try:
        _wait_for_page(url, server)
        driver = _chromium(str(tmp_path / 'chromium-profile'))
        driver.get(url)
        _wait(driver, 'input[type=file]')[0].send_keys(image)
        rows = _wait(driver, '#utuning-scores tbody tr')
        table = [(r.find_element('css selector', 'td.label').text, float(r.find_element('css selector', 'td.score').text))
                 for r in rows]
        top = _wait(driver, '[data-testid="label-output-value"]')[0].text
        bars = [e.text for e in driver.find_elements('css selector', '.confidence-set dt')]
        requested = _requested_urls(driver)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    expected = pipeline('vision-efficient-tuning', model_dir, device='cpu')(image)
    assert [label for label, _ in table] == expected['labels'] and len(table) == 5
    np.testing.assert_allclose([s for _, s in table], expected['scores'], atol=2e-6, rtol=0)  # shown to 6 decimals
    assert top == expected['labels'][0]
    assert bars == expected['labels']
    assert any(u.startswith(url) for u in requested)  # the request log works: the page's own requests are in it
    remote = sorted({u for u in requested if urlparse(u).scheme in ('http', 'https', 'ws', 'wss')
                     and urlparse(u).hostname not in ('127.0.0.1', 'localhost')})
    assert not remote, f'the page reached beyond this machine: {remote}'


def test_missing_gradio_is_one_clear_line(model_dir):
    code = ('import sys; sys.modules["gradio"] = None\n'
            'from modelscope_utuning.cli import main\n'
            f'sys.exit(main(["serve", {model_dir!r}]))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'modelscope-utuning[gradio]'" in lines[0], proc.stderr
