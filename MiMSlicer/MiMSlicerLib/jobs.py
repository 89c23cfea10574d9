"""One engine run as a subprocess that never blocks the GUI.

The engine writes one JSON object per line on stdout (`--progress json`); a reader thread puts each into a queue
and `poll()` (called from a QTimer in the widget, or a loop in scripts) drains it. `cancel()` kills the whole
process tree (its own process group / session) and removes the job's temporary folder. No Qt here."""
import collections
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import paths

log = logging.getLogger("MiMSlicer")

EXIT_EVENT = "exit"


def engineCommand(subcommand, *args, python=None):
    """`<python> -m engine <subcommand> ... --progress json` as an argument list."""
    return [python or paths.enginePython(), "-m", "engine", subcommand, *[str(a) for a in args], "--progress", "json"]


def engineEnvironment(engineRoot=None):
    """The current environment with the bundled engine importable and unbuffered output."""
    env = dict(os.environ)
    root = engineRoot or paths.engineRoot()
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def makeJobFolder(prefix):
    """A fresh temporary folder for one job, under paths.temporaryRoot()."""
    return tempfile.mkdtemp(prefix=f"mimslicer-{prefix}-", dir=paths.temporaryRoot())


class EngineJob:
    """A running engine command. Events are dicts as the engine prints them; lines that are not JSON arrive as
    {"event": "log", "message": line}; the last event is {"event": "exit", "returncode": n}."""

    def __init__(self, command, tempDir=None, env=None, cwd=None):
        self.command = list(command)
        self.tempDir = tempDir
        self.env = env if env is not None else engineEnvironment()
        self.cwd = cwd or tempDir
        self.proc = None
        self.returncode = None
        self.cancelled = False
        self.errorMessage = ""
        self.stderrTail = collections.deque(maxlen=40)
        self._queue = queue.Queue()
        self._threads = []

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self):
        log.info("MiMSlicer engine: %s", " ".join(self.command))
        popenArgs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         encoding="utf-8", errors="replace", bufsize=1, env=self.env, cwd=self.cwd)
        if sys.platform == "win32":
            popenArgs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            popenArgs["start_new_session"] = True  # own process group: cancel() reaches every child
        self.proc = subprocess.Popen(self.command, **popenArgs)
        stderrThread = threading.Thread(target=self._readStderr, daemon=True)
        stdoutThread = threading.Thread(target=self._readStdout, args=(stderrThread,), daemon=True)
        self._threads = [stderrThread, stdoutThread]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def finished(self):
        return self.returncode is not None

    @property
    def succeeded(self):
        return self.returncode == 0 and not self.cancelled

    def poll(self):
        """Events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return events
            if event.get("event") == "error" and event.get("message"):
                self.errorMessage = event["message"]
            if event.get("event") == EXIT_EVENT:
                self.returncode = event["returncode"]
                if self.returncode != 0 and not self.errorMessage and not self.cancelled:
                    self.errorMessage = self._messageFromStderr()
            events.append(event)

    def wait(self, timeout=None, onEvents=None):
        """Block until the process ends (for scripts and tests; the GUI uses poll() from a timer)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            events = self.poll()
            if onEvents and events:
                onEvents(events)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"engine did not finish within {timeout} s: {' '.join(self.command)}")
            time.sleep(0.05)
        return self.returncode

    def cancel(self):
        """Kill the process tree, wait for it, remove the temporary folder. Safe to call more than once."""
        if self.proc is not None and not self.finished:
            self.cancelled = True  # the user's choice wins, even if the engine was just finishing
            if self.proc.poll() is None:
                killProcessTree(self.proc)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("MiMSlicer: engine process %s did not stop", self.proc.pid)
        for thread in self._threads:
            thread.join(timeout=5)
        self.poll()
        self.removeTempDir()

    def removeTempDir(self):
        if self.tempDir and os.path.isdir(self.tempDir):
            shutil.rmtree(self.tempDir, ignore_errors=True)

    # -- reader threads --------------------------------------------------------------------------------------
    def _readStdout(self, stderrThread):
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                event = {"event": "log", "message": line}
            self._queue.put(event)
        stderrThread.join()
        returncode = self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        self._queue.put({"event": EXIT_EVENT, "returncode": returncode})

    def _readStderr(self):
        for line in self.proc.stderr:
            line = line.rstrip()
            if line:
                self.stderrTail.append(line)
                self._queue.put({"event": "log", "stream": "stderr", "message": line})

    def _messageFromStderr(self):
        for line in reversed(self.stderrTail):
            if line.startswith("error: "):
                return line[len("error: "):]
        tail = [line for line in self.stderrTail if line.strip()]
        if tail:
            return f"the engine stopped (exit code {self.returncode}): {tail[-1]}"
        return f"the engine stopped (exit code {self.returncode}) without a message"


def killProcessTree(proc):
    """Kill a process started by EngineJob and everything it started."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the job is its own session leader: pgid == pid
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()
