"""The panel's behaviour in desktop Slicer that needs no engine run: the harness stand-ins behave like the CTK widgets
they replace, and the widget code reacts to the scene and to typing as it must in Slicer."""
import qt
from PySide6.QtTest import QTest

try:
    from __feature__ import true_property  # noqa: F401  (read widgets the PythonQt way, as the module does)
except ImportError:
    pass

from slicer_test_env._mrml_widgets import ctkPathLineEdit


# -- the stand-ins behave like CTK's widgets ---------------------------------------------------------------------
def test_path_line_edit_emits_only_paths_its_filter_accepts():
    """ctkPathLineEdit: currentPathChanged only for text the name filters accept (never for ''), validInputChanged
    when that flips; CTK's pattern makes the last letter of each extension optional."""
    edit = ctkPathLineEdit()
    edit.nameFilters = ["Checkpoints (*.pt *.pth)"]
    paths, valid = [], []
    edit.currentPathChanged.connect(paths.append)
    edit.validInputChanged.connect(valid.append)
    line = edit.comboBox().lineEdit()
    QTest.keyClicks(line, "/a/b.pt")
    assert paths == ["/a/b.p", "/a/b.pt"] and valid == [True]
    line.clear()
    assert paths == ["/a/b.p", "/a/b.pt"] and valid == [True, False]
    edit.currentPath = "/a/model.ckpt"
    assert edit.currentPath == "/a/model.ckpt" and paths[-1] == "/a/b.pt"  # shown, never emitted
    edit.currentPath = "/a/model.pth"
    assert paths[-1] == "/a/model.pth" and valid == [True, False, True]


def test_exceptions_in_slots_and_observers_are_caught(failOnCallbackExceptions):
    """PySide6 and VTK only print what a slot or an observer raises; the harness collects it and fails the test."""
    import vtk
    button = qt.QPushButton()
    button.clicked.connect(lambda *_: 1 / 0)
    button.click()
    node = vtk.vtkObject()
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: {}["missing"])
    node.Modified()
    assert [e.strip().splitlines()[-1].split(":")[0] for e in failOnCallbackExceptions] == ["ZeroDivisionError",
                                                                                             "KeyError"]
    failOnCallbackExceptions.clear()  # seen: this test passes
