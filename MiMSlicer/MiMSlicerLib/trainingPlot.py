"""Live fine-tuning curves as Slicer table + plot nodes: training loss at every step, validation Dice (mean and per
label) whenever the engine reports a validation. Two tables (so each curve is a connected line), one chart."""
import math

import vtk
import slicer

STEP, LOSS, MEAN_DICE = "step", "loss", "val_mean_dice"
LOSS_COLOUR, DICE_COLOUR = (0.85, 0.35, 0.10), (0.10, 0.45, 0.85)
LABEL_COLOURS = [(0.20, 0.65, 0.30), (0.60, 0.30, 0.70), (0.90, 0.70, 0.10), (0.40, 0.70, 0.80), (0.80, 0.40, 0.60)]


class TrainingPlot:
    def __init__(self, scene, name):
        self.scene = scene
        self.lossTable = self._newTable(f"{name} loss", [STEP, LOSS])
        self.diceTable = self._newTable(f"{name} validation", [STEP, MEAN_DICE])
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss  |  validation Dice")
        self.series = {}
        self._addSeries(self.lossTable, LOSS, "training loss", LOSS_COLOUR)
        self._addSeries(self.diceTable, MEAN_DICE, "validation Dice (mean)", DICE_COLOUR, markers=True)

    def nodes(self):
        return [self.lossTable, self.diceTable, self.chart] + list(self.series.values())

    def addEvent(self, event):
        """Take one engine progress event; True when it added a point."""
        if event.get("event") != "step" or "step" not in event:
            return False
        step = float(event["step"])
        losses = event.get("losses") or {}
        loss = losses.get("loss", next(iter(losses.values()), None))
        added = False
        if loss is not None:
            self._appendRow(self.lossTable, {STEP: step, LOSS: _number(loss)})
            added = True
        metrics = event.get("metrics") or {}
        if metrics:
            for key in metrics:
                if key.startswith("dice/") and key not in self.series:
                    self._addColumn(self.diceTable, key)
                    colour = LABEL_COLOURS[(len(self.series) - 2) % len(LABEL_COLOURS)]
                    self._addSeries(self.diceTable, key, f"Dice {key[5:]}", colour, markers=True, dashed=True)
            self._appendRow(self.diceTable, dict({STEP: step}, **{k: _number(v) for k, v in metrics.items()}))
            added = True
        return added

    def column(self, table, name):
        return slicer.util.arrayFromTableColumn(table, name).copy()

    # -- nodes -----------------------------------------------------------------------------------------------
    def _newTable(self, name, columns):
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in columns:
            self._addColumn(table, column)
        return table

    @staticmethod
    def _addColumn(tableNode, name):
        table = tableNode.GetTable()
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfTuples(table.GetNumberOfRows())
        array.Fill(math.nan)
        table.AddColumn(array)

    def _addSeries(self, tableNode, column, title, colour, markers=False, dashed=False):
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName(STEP)
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if markers
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        if dashed:
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
        series.SetColor(*colour)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[column] = series

    @staticmethod
    def _appendRow(tableNode, row):
        table = tableNode.GetTable()
        index = table.InsertNextBlankRow(math.nan)
        for c in range(table.GetNumberOfColumns()):
            table.SetValue(index, c, vtk.vtkVariant(row.get(table.GetColumnName(c), math.nan)))
        table.Modified()
        tableNode.Modified()


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
