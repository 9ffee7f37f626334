"""One resolved tuner schema: parsing returns a frozen spec with every default filled in by the kind, ``check``
only validates, and what files store (``spec.to_entry()``) parses back to an equal spec."""
from __future__ import annotations

import dataclasses

import pytest

from modelscope_utuning.tuners import Dims, parse_tuner, tuner_kinds
from modelscope_utuning.tuners.lora import DEFAULT_LR_RATIO

DIMS = Dims(embed_dim=32, num_heads=4, mlp_hidden=128, depth=3, act='gelu')

ENTRIES = [
    {'type': 'adapter', 'op': 'ffn', 'dim': 4},
    {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'length': 4, 'scale': 'scalar', 'join': 'layer_scale'},
    {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': [2, 0, 3]},
    {'type': 'adapter', 'op': 'block', 'dim': 4, 'act': 'relu', 'layers': [0, 2]},
    {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 5},
    {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'dim': 5},
    {'type': 'prompt', 'op': 'ffn', 'length': 3, 'scale': 'input', 'scale_init': 0.5},
    {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 3, 'layers': 1},
    {'type': 'lora', 'op': 'mha', 'rank': 2},
    {'type': 'lora', 'op': 'ffn', 'dim': [1, 2, 4], 'alpha': 8, 'lr_ratio': 1},
    {'type': 'ssf', 'op': 'mha', 'init_std': 0.02},
    {'type': 'repadapter', 'op': 'ffn', 'dim': 4, 'groups': 4},
    {'type': 'bitfit', 'layers': [1]},
    {'type': 'side'},
    {'type': 'side', 'net': 'FCN4', 'dim': 32},
    {'type': 'vertical', 'dim': 4},
]


def test_every_kind_is_covered():
    assert {e['type'] for e in ENTRIES} == set(tuner_kinds())


@pytest.mark.parametrize('entry', ENTRIES, ids=lambda e: '-'.join(str(v) for v in e.values()))
def test_to_entry_parses_back_to_the_same_spec_and_names_every_option(entry):
    spec = parse_tuner(entry, DIMS)
    stored = spec.to_entry()
    again = parse_tuner(stored, DIMS)
    assert again == spec
    assert again.to_entry() == stored  # a fixed point: reading and writing again changes nothing
    assert {f.name for f in dataclasses.fields(spec.kind.Config)} <= set(stored)
    assert sum(k in stored for k in spec.kind.size_keys) <= 1  # one spelling of the size
    if spec.kind.size_keys and any(k in entry for k in spec.kind.size_keys):
        assert spec.kind.size_keys[0] in stored


@pytest.mark.parametrize('entry', ENTRIES, ids=lambda e: '-'.join(str(v) for v in e.values()))
def test_a_spec_and_its_options_cannot_be_changed_after_parsing(entry):
    spec = parse_tuner(entry, DIMS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sizes = ()
    field = dataclasses.fields(spec.options)
    if field:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec.options, field[0].name, None)
    assert isinstance(spec.sizes, tuple)


def test_defaults_are_the_kinds_real_values_for_this_backbone():
    p_adapter = parse_tuner({'type': 'adapter', 'op': 'ffn', 'dim': 4}, DIMS)
    assert (p_adapter.form, p_adapter.scale, p_adapter.join, p_adapter.scale_init, p_adapter.act) == \
        ('parallel', 'channel', 'residual', 1.0, 'gelu')
    assert parse_tuner({'type': 'adapter', 'dim': 4}, dataclasses.replace(DIMS, act='relu')).act == 'relu'
    s_adapter = parse_tuner({'type': 'adapter', 'form': 'sequential', 'dim': 4}, DIMS)
    assert (s_adapter.scale, s_adapter.join, s_adapter.scale_init) == ('none', None, None)
    p_prompt = parse_tuner({'type': 'prompt', 'op': 'mha', 'length': 2}, DIMS)
    assert p_prompt.scale_init == 0.0  # a P-Prompt's scale starts at zero (its tokens do not)
    lora = parse_tuner({'type': 'lora', 'rank': 2}, DIMS)
    assert (lora.op, lora.lr_ratio, lora.alpha) == ('mha', DEFAULT_LR_RATIO, None)
    vertical = parse_tuner({'type': 'vertical', 'dim': 4}, DIMS)
    assert vertical.sizes == (0, 4, 4) and vertical.act == 'gelu' and vertical.scale == 'channel'
    assert parse_tuner({'type': 'side', 'net': 'FCN4'}, DIMS).net == 'fcn4'


def test_spelling_does_not_make_two_specs():
    a = parse_tuner({'type': 'adapter', 'op': 'ffn', 'dim': 4}, DIMS)
    b = parse_tuner({'op': 'ffn', 'length': 4, 'type': 'adapter', 'form': 'parallel', 'scale': 'channel',
                     'join': 'residual', 'act': 'gelu', 'scale_init': None}, DIMS)
    assert a == b and a.signature() == b.signature()


@pytest.mark.parametrize('entry,fragment', [
    ({'type': 'adapter', 'dim': 4, 'length': 4}, 'dim and length both give the size'),
    ({'type': 'adapter', 'form': 'sequential', 'dim': 4, 'scale_init': 0.5}, '"scale_init" is an option of the '
                                                                             'parallel form'),
    ({'type': 'prefix', 'form': 'sequential', 'length': 4, 'join': 'residual'}, '"join" is an option'),
    ({'type': 'lora', 'rank': 2, 'lr_ratio': 0}, 'lr_ratio must be a positive number'),
    ({'type': 'lora', 'rank': 2, 'alpha': -1}, 'alpha must be a positive number'),
    ({'type': 'vertical', 'dim': 4, 'layers': [0, 1]}, 'layer 0 has no bypass stream'),
])
def test_contradictions_are_named(entry, fragment):
    with pytest.raises(ValueError, match='tuner entry') as e:
        parse_tuner(entry, DIMS)
    assert fragment in str(e.value)


@pytest.mark.parametrize('kind,op', [('adapter', 'ffn'), ('prefix', 'mha'), ('prompt', 'block')])
def test_each_form_of_a_kind_is_its_own_small_class(kind, op):
    from modelscope_utuning.tuners import build_tuner
    cls = tuner_kinds()[kind]
    par, seq = (build_tuner(parse_tuner({'type': kind, 'op': op, 'form': form, cls.size_keys[0]: 3}, DIMS), 3, DIMS)
                for form in ('parallel', 'sequential'))
    assert type(par) is cls and type(seq) is not cls and isinstance(seq, cls)
    assert hasattr(par, 'scale') and not hasattr(seq, 'scale')  # the parallel form's learned s only
    assert par.points == (op,) and seq.points != par.points or kind == 'adapter'
    assert (par.form, seq.form) == ('parallel', 'sequential')
