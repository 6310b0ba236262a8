"""
Only enrolled nodes get in: the system secured with DDS Security (SROS2 keystore, Enforce).

``tools/make_keystore.sh`` writes the keystore (identity CA, permissions CA, one enclave per
node, signed governance and permissions); ``Bringup(keystore=...)`` runs each node in enclave
``/timebill/<name>``. Where a secured participant can be created, the secured system serves an
enrolled client, while a client with no identity, or one from another CA, never sees the server
and its goal never reaches it (the server's bag records no such goal). Whether security works
is found out at run time by creating a secured participant: a Fast DDS built without
``-DSECURITY=ON`` (the PyPI wheels) refuses, and the secured tests are skipped with its exact
error. The keystore itself is checked with openssl everywhere.
"""

from contextlib import contextmanager
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ros]

ROOT = Path(__file__).resolve().parent.parent
MAKE_KEYSTORE = ROOT / 'tools' / 'make_keystore.sh'
CLIENT = 'timebill_security_client'
SECURITY_VARS = ('ROS_SECURITY_KEYSTORE', 'ROS_SECURITY_ENABLE', 'ROS_SECURITY_STRATEGY')
PROBE = (
    'import sys\n'
    'import rclpy\n'
    "rclpy.init(args=['--ros-args', '--enclave', sys.argv[1]])\n"
    "rclpy.create_node('timebill_security_probe').destroy_node()\n"
    'rclpy.shutdown()\n'
)


def make_keystore(path: Path, *enclaves: str) -> Path:
    if shutil.which('openssl') is None:
        pytest.skip('openssl is not installed: tools/make_keystore.sh needs it')
    subprocess.run(
        [str(MAKE_KEYSTORE), str(path), *enclaves], check=True, capture_output=True, text=True
    )
    return path


def secured_participant_error(keystore: Path, enclave: str) -> str:
    """Create a secured participant in a fresh process: '' if it works, else its error."""
    from timebill_ros.bringup import ros_env, security_env

    env = ros_env() | security_env(keystore)
    done = subprocess.run(
        [sys.executable, '-P', '-c', PROBE, enclave],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if done.returncode == 0:
        return ''
    err = done.stderr.strip()
    at = err.rfind('RCLError: ')
    return err[at + len('RCLError: '):] if at >= 0 else '\n'.join(err.splitlines()[-5:])


@contextmanager
def _security(keystore):
    """Set (keystore given) or clear the rcl security variables while a context initialises."""
    from timebill_ros.bringup import security_env

    saved = {k: os.environ.get(k) for k in SECURITY_VARS}
    for k in SECURITY_VARS:
        os.environ.pop(k, None)
    os.environ.update(security_env(keystore) if keystore else {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_client(domain: int, name: str, keystore=None):
    """Make a client in its own context: enrolled as /timebill/<name> when a keystore is given."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.bringup import enclave_of
    from timebill_ros.client import TimeBillClient

    context = Context()
    args = ['--ros-args', '--enclave', enclave_of(name)] if keystore else []
    with _security(keystore):
        rclpy.init(args=args, context=context, domain_id=domain,
                   signal_handler_options=SignalHandlerOptions.NO)
        return TimeBillClient(name, context=context)


# ------------------------------------------------------------------------ everywhere
def test_make_keystore_writes_the_sros2_layout_and_its_signatures_verify(tmp_path):
    ks = make_keystore(tmp_path / 'ks', 'timebill_server', '/timebill/other')
    enclave = ks / 'enclaves' / 'timebill' / 'timebill_server'
    for name in ('cert.pem', 'key.pem', 'identity_ca.cert.pem', 'permissions_ca.cert.pem',
                 'governance.p7s', 'permissions.xml', 'permissions.p7s'):
        assert (enclave / name).is_file(), name
    assert (ks / 'enclaves' / 'timebill' / 'other' / 'permissions.p7s').is_file()
    ca = ks / 'public' / 'permissions_ca.cert.pem'
    for signed in (enclave / 'permissions.p7s', enclave / 'governance.p7s'):
        subprocess.run(['openssl', 'smime', '-verify', '-text', '-in', str(signed),
                        '-CAfile', str(ca), '-out', os.devnull], check=True, capture_output=True)
    subprocess.run(['openssl', 'verify', '-CAfile', str(ks / 'public' / 'identity_ca.cert.pem'),
                    str(enclave / 'cert.pem')], check=True, capture_output=True)
    subject = subprocess.run(
        ['openssl', 'x509', '-in', str(enclave / 'cert.pem'), '-noout', '-subject',
         '-nameopt', 'RFC2253'], capture_output=True, text=True, check=True,
    ).stdout
    assert 'CN=/timebill/timebill_server' in subject
    assert '<subject_name>CN=/timebill/timebill_server</subject_name>' in (
        enclave / 'permissions.xml').read_text()
    governance = (ks / 'enclaves' / 'governance.xml').read_text()
    assert '<allow_unauthenticated_participants>false' in governance
    assert '<data_protection_kind>ENCRYPT' in governance


def test_bringup_runs_each_node_in_its_enclave(tmp_path):
    from timebill_ros.bringup import Bringup

    secured = Bringup(keystore=tmp_path)
    cmd = secured.command('timebill_server')
    assert cmd[cmd.index('--enclave') + 1] == '/timebill/timebill_server'
    assert secured.env['ROS_SECURITY_KEYSTORE'] == str(tmp_path.resolve())
    assert secured.env['ROS_SECURITY_STRATEGY'] == 'Enforce'
    assert '--enclave' not in Bringup().command('timebill_server')


# ------------------------------------------------------------- where security works
@pytest.fixture(scope='module')
def keystore(ros_domain_id, tmp_path_factory):
    """Give the system's keystore, or skip with the error a secured participant gets here."""
    from timebill_ros.bringup import NODES

    ks = make_keystore(tmp_path_factory.mktemp('sros2') / 'keystore',
                       *(spec.name for spec in NODES), CLIENT)
    error = secured_participant_error(ks, f'/timebill/{CLIENT}')
    if error:
        print(f'test_ros_security: a secured participant fails here: {error}')
        pytest.skip(f'DDS Security does not work with this Fast DDS: {error}')
    return ks


@pytest.fixture(scope='module')
def secured(keystore, ros_domain_id, tmp_path_factory):
    """Bring the system up with security enforced (tiny model); yield nodes, client, domain."""
    from timebill_ros.bringup import Bringup
    from timebill_ros.core.model import ensure_tiny_model

    from conftest import close_client

    ensure_tiny_model()
    domain = (ros_domain_id + 60) % 230
    bags = tmp_path_factory.mktemp('sros2_bags')
    nodes = Bringup(
        overrides={'threads': 1, 'model': 'tiny', 'weights': 'fp32', 'record_bag': str(bags)},
        domain_id=domain, log_dir=tmp_path_factory.mktemp('sros2_logs'), keystore=keystore,
    )
    nodes.bag_dir = bags
    client = make_client(domain, CLIENT, keystore)
    try:
        nodes.up(client, timeout_s=240.0)
        assert client.wait_until_ready(60.0), nodes.log_tail('timebill_server')
        yield nodes, client, domain
    finally:
        nodes.stop()
        close_client(client)


def _recorded_prompts(nodes, timeout_s=5.0):
    from timebill_ros.core.evaluation.bags import read_requests

    time.sleep(timeout_s)  # anything that reached the server is in the bag by now
    bags = sorted(p for p in nodes.bag_dir.iterdir() if p.is_dir())
    return {r.prompt for bag in bags for r in read_requests(bag)}


@pytest.mark.slow
def test_an_enrolled_client_is_served(secured):
    nodes, client, _ = secured
    out = client.ask('Name a color. (enrolled)', 30.0, max_new_tokens=8)
    assert out.status_name == 'succeeded', out.reason
    assert 'Name a color. (enrolled)' in _recorded_prompts(nodes)


@pytest.mark.slow
@pytest.mark.parametrize('who', ['no identity', 'another CA'])
def test_an_unenrolled_clients_goal_never_reaches_the_server(secured, who, tmp_path):
    from conftest import close_client

    nodes, _, domain = secured
    foreign = make_keystore(tmp_path / 'foreign', CLIENT) if who == 'another CA' else None
    intruder = make_client(domain, CLIENT if foreign else 'timebill_intruder', foreign)
    prompt = f'Name a color. ({who})'
    try:
        assert intruder.get_state('timebill_server', timeout_s=10.0) == ''
        out = intruder.ask(prompt, 30.0, max_new_tokens=8, timeout_s=20)
    finally:
        close_client(intruder)
    assert not out.accepted and 'action server' in out.reason, out
    assert prompt not in _recorded_prompts(nodes)
