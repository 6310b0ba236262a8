"""
The node list and parameters, and a runner for machines without ``launch_ros``.

One source for the launch file and ``timebill bringup``: ``launch/bringup.launch.py`` builds
launch_ros actions from ``NODES`` and ``params_args``; ``Bringup`` starts the same nodes as
separate processes with the same ``--ros-args``, has ``timebill_lifecycle_manager`` bring
the system to active through the standard lifecycle services, and stops everything cleanly
(SIGINT, then SIGTERM, then SIGKILL, each process by its own id).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Dict, IO, Iterable, List, Mapping, Optional, Sequence

from timebill_ros.core.config import default_config_path

PACKAGE = 'timebill_ros'


@dataclass(frozen=True)
class NodeSpec:
    name: str  # node name (the executable too, unless ``executable`` says otherwise)
    module: str  # `python -m <module>` runs the same main()
    executable: str = ''  # in lib/timebill_ros (`ros2 run timebill_ros <executable>`)

    @property
    def program(self) -> str:
        return self.executable or self.name


# Process start order does not matter: the lifecycle manager configures and activates the
# others in its own order (predictor, generator, server) once their services answer.
NODES = (
    NodeSpec('timebill_generator', 'timebill_ros.nodes.generator'),
    NodeSpec('timebill_predictor', 'timebill_ros.nodes.predictor'),
    NodeSpec('timebill_server', 'timebill_ros.nodes.server'),
    NodeSpec('timebill_lifecycle_manager', 'timebill_ros.nodes.lifecycle_manager'),
)
SERVER = 'timebill_server'
MANAGER = 'timebill_lifecycle_manager'
GENERATOR = 'timebill_generator'
PREDICTOR = 'timebill_predictor'


def generator_names(generators) -> List[str]:
    """
    Name the generators of a system from a count or from names.

    A count: 1 is ``timebill_generator``, n are ``timebill_generator_0`` to ``..._<n-1>``;
    names: a list, or one comma-separated string.
    """
    if isinstance(generators, str):
        generators = generators.strip()
        if generators.isdigit():
            generators = int(generators)
        else:
            generators = [g.strip() for g in generators.split(',') if g.strip()]
    if isinstance(generators, int):
        if generators < 1:
            raise ValueError(f'a system needs at least one generator, got {generators}')
        return [GENERATOR] if generators == 1 else [f'{GENERATOR}_{i}' for i in range(generators)]
    names = list(generators)
    if not names or len(set(names)) != len(names):
        raise ValueError(f'generators must be distinct node names, got {names}')
    return names


def fleet_nodes(names: List[str]) -> tuple:
    """Return ``NODES`` with one generator process per name (same executable)."""
    out = []
    for spec in NODES:
        if spec.name == GENERATOR:
            out += [NodeSpec(n, spec.module, GENERATOR) for n in names]
        else:
            out.append(spec)
    return tuple(out)


def fleet_parameters(names: List[str]) -> dict:
    """
    Return the params-file content that makes a system of these generators.

    Every node reads ``generators``; the lifecycle manager brings the generators up between the
    predictor and the server (and down in reverse).
    """
    return {
        '/**': {'ros__parameters': {'generators': list(names)}},
        f'/**/{MANAGER}': {'ros__parameters': {'node_names': [PREDICTOR, *names, SERVER]}},
    }


NO_AUTOSTART = Path(__file__).resolve().parent / 'data' / 'no_autostart.yaml'


def params_file(path: Optional[str | os.PathLike] = None) -> Path:
    """Return the parameters file every node reads (``config/timebill.yaml`` unless given)."""
    return Path(path).expanduser().resolve() if path else default_config_path()


def param_literal(value) -> str:
    """Write a value as ``-p name:=value`` expects it (YAML: a string that reads as text)."""
    import yaml

    if isinstance(value, str):
        # a path or any text: quoted when YAML would read it as something else (a number, a
        # bool, '') so the parameter keeps its type
        return value if value and yaml.safe_load(value) == value else json.dumps(value)
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return repr(value)


def params_args(
    spec: NodeSpec,
    params: Path,
    overrides: Mapping[str, object] = (),
    namespace: str = '',
    enclave: str = '',
) -> List[str]:
    """Return the ``--ros-args`` for one node: its name, enclave, params file, then overrides."""
    args = ['--ros-args', '-r', f'__node:={spec.name}']
    if namespace.strip('/'):
        args += ['-r', f'__ns:=/{namespace.strip("/")}']
    if enclave:
        args += ['--enclave', enclave]
    args += ['--params-file', str(params)]
    for key, value in dict(overrides).items():
        args += ['-p', f'{key}:={param_literal(value)}']
    return args


# ------------------------------------------------------------------------------ security
ENCLAVE_ROOT = '/timebill'  # a secured system: node <name> runs in enclave /timebill/<name>


def enclave_of(name: str) -> str:
    """Return the SROS2 enclave a node (or client) named ``name`` runs in when secured."""
    return f'{ENCLAVE_ROOT}/{name}'


def security_env(keystore: str | os.PathLike) -> Dict[str, str]:
    """Return the variables that make rcl enforce DDS Security from ``keystore`` (SROS2 layout)."""
    return {
        'ROS_SECURITY_KEYSTORE': str(Path(keystore).expanduser().resolve()),
        'ROS_SECURITY_ENABLE': 'true',
        'ROS_SECURITY_STRATEGY': 'Enforce',
    }


# --------------------------------------------------------------------------- environment
def install_prefix() -> Path:
    """Return this package's colcon install prefix (``<repo>/install/timebill_ros``)."""
    here = Path(__file__).resolve()
    for root in (here.parents[1], *here.parents):
        candidate = root / 'install' / PACKAGE
        if candidate.is_dir():
            return candidate
    return here.parents[1] / 'install' / PACKAGE


def ros_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """
    Return ``base`` plus what ``source install/setup.bash`` would add.

    So nodes import the built interfaces and find their type-support libraries even when nothing
    was sourced.
    """
    env = dict(os.environ if base is None else base)
    prefix = install_prefix()
    venv = Path(sys.prefix)
    version = f'python{sys.version_info.major}.{sys.version_info.minor}'
    site = prefix / 'lib' / version / 'site-packages'

    def prepend(name: str, value: Path) -> None:
        parts = [p for p in env.get(name, '').split(os.pathsep) if p]
        if str(value) not in parts:
            env[name] = os.pathsep.join([str(value), *parts])

    prepend('LD_LIBRARY_PATH', prefix / 'lib')
    prepend('PYTHONPATH', site)
    prepend('AMENT_PREFIX_PATH', venv)
    prepend('AMENT_PREFIX_PATH', prefix)
    env.setdefault('PYTHONUNBUFFERED', '1')
    return env


def ros_env_active() -> bool:
    """Tell whether this process already has the install's libraries and Python path."""
    want = ros_env()
    have = os.environ
    return all(
        set(want[k].split(os.pathsep)) <= set(have.get(k, '').split(os.pathsep))
        for k in ('LD_LIBRARY_PATH', 'PYTHONPATH')
    )


def reexec_with_ros_env() -> None:
    """
    Restart this command with the install environment if it is missing (no-op otherwise).

    The type-support libraries must be on LD_LIBRARY_PATH before the process starts.
    """
    if ros_env_active() or os.environ.get('_TIMEBILL_REEXEC') == '1':
        return
    if not (install_prefix() / 'lib').is_dir():
        raise SystemExit(
            f'timebill_ros is not built ({install_prefix()} is missing): run `make ros`'
        )
    env = ros_env()
    env['_TIMEBILL_REEXEC'] = '1'
    code = 'import sys; from timebill_ros.cli import main; sys.exit(main())'
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, '-P', '-c', code, *sys.argv[1:]], env)


# ------------------------------------------------------------------------------- runner
class Bringup:
    """
    Start the nodes as processes, drive the server to active, stop them cleanly.

    ``with Bringup(domain_id=42) as b: ...`` brings everything up and always tears it down.
    ``keystore``: run secured (SROS2 keystore, see tools/make_keystore.sh), each node in enclave
    ``/timebill/<name>``. ``wrap``: node name -> a command prefix it runs under (e.g.
    ``['ip', 'netns', 'exec', 'tb_b']``: that node in another network namespace); the prefix
    must exec the node in its own process, as signals go to the process started.
    """

    def __init__(
        self,
        params: Optional[str | os.PathLike] = None,
        overrides: Optional[Mapping] = None,
        nodes: Iterable[NodeSpec] = NODES,
        domain_id: Optional[int] = None,
        log_dir: Optional[str | os.PathLike] = None,
        env: Optional[Mapping[str, str]] = None,
        namespace: str = '',
        generators=None,
        keystore: Optional[str | os.PathLike] = None,
        wrap: Optional[Mapping[str, Sequence[str]]] = None,
    ):
        self.params = params_file(params)
        self.keystore = keystore
        self.wrap = {name: list(prefix) for name, prefix in (wrap or {}).items()}
        self.namespace = namespace
        self.overrides = dict(overrides or {})
        # several generators: their nodes, and a second params file that names them to all
        self.generators = generator_names(generators) if generators is not None else None
        self.fleet_params: Optional[Path] = None
        if self.generators is not None:
            import tempfile

            import yaml

            nodes = fleet_nodes(self.generators)
            fd, path = tempfile.mkstemp(prefix='timebill_fleet_', suffix='.yaml')
            with os.fdopen(fd, 'w') as fh:
                yaml.safe_dump(fleet_parameters(self.generators), fh)
            self.fleet_params = Path(path)
        self.nodes = {spec.name: spec for spec in nodes}
        self.domain_id = domain_id
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = ros_env(env)
        if domain_id is not None:
            self.env['ROS_DOMAIN_ID'] = str(domain_id)
        if keystore:
            self.env.update(security_env(keystore))
        self.procs: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, IO] = {}

    # ---- processes
    def command(self, name: str) -> List[str]:
        spec = self.nodes[name]
        enclave = enclave_of(name) if self.keystore else ''
        args = params_args(spec, self.params, self.overrides, self.namespace, enclave)
        if self.fleet_params is not None:  # after the main file: its values win
            at = args.index('--params-file') + 2
            args[at:at] = ['--params-file', str(self.fleet_params)]
        if name == MANAGER:
            # this runner drives the startup and reports why it failed: no autostart. A node's
            # own section of a params file outranks `-p`, so the override is a second file.
            at = args.index('--params-file') + 2
            args[at:at] = ['--params-file', str(NO_AUTOSTART)]
        # -P: never let the working directory's source tree (no generated msgs) shadow the install
        return [*self.wrap.get(name, ()), sys.executable, '-P', '-m', spec.module, *args]

    def start(self, names: Optional[Iterable[str]] = None) -> None:
        for name in names or self.nodes:
            if name in self.procs and self.procs[name].poll() is None:
                continue
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = self._logs[name] = open(self.log_dir / f'{name}.log', 'ab')
            # own session: a terminal's Ctrl-C reaches only the runner, which forwards it in order
            self.procs[name] = subprocess.Popen(
                self.command(name),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
            )

    def alive(self) -> Dict[str, Optional[int]]:
        """Name -> None while running, else its exit code."""
        return {name: p.poll() for name, p in self.procs.items()}

    def log_tail(self, name: str, chars: int = 3000) -> str:
        if self.log_dir is None or not (self.log_dir / f'{name}.log').is_file():
            return ''
        return (self.log_dir / f'{name}.log').read_text(errors='replace')[-chars:]

    def stop(
        self, names: Optional[Iterable[str]] = None, timeout_s: float = 10.0
    ) -> Dict[str, Optional[int]]:
        """SIGINT each (server first), wait, then SIGTERM, then SIGKILL; return exit codes."""
        order = list((names or reversed(list(self.procs))))
        steps = ((signal.SIGINT, timeout_s), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))
        for sig, wait in steps:
            running = [n for n in order if n in self.procs and self.procs[n].poll() is None]
            if not running:
                break
            for n in running:
                try:
                    self.procs[n].send_signal(sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            for n in running:
                try:
                    self.procs[n].wait(max(end - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
        codes = {n: self.procs[n].poll() for n in order if n in self.procs}
        for n in order:
            self.procs.pop(n, None)
            log = self._logs.pop(n, None)
            if log is not None:
                log.close()
        return codes

    # ---- readiness and lifecycle
    def wait_ready(self, client, timeout_s: float = 120.0) -> None:
        """Wait until every started node's lifecycle services answer."""
        end = time.monotonic() + timeout_s
        for name in self.procs:
            while True:
                left = end - time.monotonic()
                code = self.procs[name].poll()
                if code is not None:
                    raise RuntimeError(
                        f'{name} exited with code {code} while starting\n{self.log_tail(name)}'
                    )
                if left <= 0:
                    raise TimeoutError(
                        f'{name} not ready after {timeout_s:g} s\n{self.log_tail(name)}'
                    )
                if client.wait_for_lifecycle(name, min(left, 1.0)):
                    break

    def prepare(self) -> None:
        """Convert the default model once, before two nodes race to convert it at the same time."""
        from timebill_ros.core.config import DEFAULT_MODEL, TimeBillConfig
        from timebill_ros.core.model import default_model_dir

        model = self.overrides.get('model') or TimeBillConfig.from_yaml(self.params).model
        if model in ('', DEFAULT_MODEL) and not (default_model_dir() / 'config.json').is_file():
            code = 'from timebill_ros.core.model import ensure_default_model as e; e()'
            subprocess.run([sys.executable, '-c', code], env=self.env, check=True)

    def up(self, client, timeout_s: float = 120.0) -> None:
        """Start all nodes, wait for them, and have the lifecycle manager activate them."""
        self.prepare()
        self.start()
        self.wait_ready(client, timeout_s)
        # configure loads every model: give it the whole timeout
        if MANAGER in self.procs and not client.startup(timeout_s=timeout_s):
            raise RuntimeError(
                f'could not activate the system ({MANAGER}: {client.get_state()})\n'
                f'{self.log_tail(MANAGER)}'
            )

    def __enter__(self) -> 'Bringup':
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
