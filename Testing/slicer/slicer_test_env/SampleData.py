"""Test-harness stand-in for Slicer's SampleData module, only as far as MiMSlicer uses it: SampleDataSource (its
constructor's normalisation and length check) and SampleDataLogic's registry of custom sources in
slicer.modules.sampleDataSources. Follows Modules/Scripted/SampleData/SampleData.py of Slicer 5.10 (the signature of
registerCustomSampleDataSource, which has no sampleDescription: the button text is the sample name); no widget, no
download. `click` does what a category button's clicked() does: customDownloader(source), or the logic's download."""
import slicer


class SampleDataSource:
    def __init__(self, sampleName=None, sampleDescription=None, uris=None, fileNames=None, nodeNames=None,
                 checksums=None, loadFiles=None, customDownloader=None, thumbnailFileName=None,
                 loadFileTypes=None, loadFileProperties=None, loadFileType=None):
        if loadFileType is not None and loadFileTypes is not None:
            raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
        if loadFileType is not None:
            loadFileTypes = loadFileType
        self.sampleName = sampleName
        self.sampleDescription = sampleName if sampleDescription is None else sampleDescription
        if isinstance(uris, (list, tuple)):
            n = len(uris)
            loadFileTypes = [loadFileTypes] * n if isinstance(loadFileTypes, str) or loadFileTypes is None else loadFileTypes
            nodeNames = [None] * n if nodeNames is None else nodeNames
            loadFiles = [None] * n if loadFiles is None else loadFiles
            checksums = [None] * n if checksums is None else checksums
        elif isinstance(uris, str):
            uris, fileNames, nodeNames = [uris], [fileNames], [nodeNames]
            loadFiles, loadFileTypes, checksums = [loadFiles], [loadFileTypes], [checksums]
        self.uris, self.fileNames, self.nodeNames, self.loadFiles = uris, fileNames, nodeNames, loadFiles
        self.customDownloader, self.thumbnailFileName = customDownloader, thumbnailFileName
        self.loadFileTypes, self.loadFileProperties = loadFileTypes, loadFileProperties or {}
        self.checksums = checksums
        if not len(uris) == len(fileNames) == len(nodeNames) == len(loadFiles) == len(loadFileTypes) == len(checksums):
            raise ValueError("All fields of sample data source must have the same length")

    def __eq__(self, other):
        return str(self) == str(other)

    def __str__(self):
        return "\n".join(f"{k} : {getattr(self, k)}" for k in (
            "sampleName", "sampleDescription", "thumbnailFileName", "loadFileProperties", "customDownloader",
            "uris", "fileNames", "nodeNames", "loadFiles", "loadFileTypes", "checksums"))


class SampleDataLogic:
    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                       customDownloader=None, thumbnailFileName=None, loadFileTypes=None,
                                       loadFiles=None, loadFileProperties={}, checksums=None, loadFileType=None):
        if loadFileType is not None and loadFileTypes is not None:
            raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
        if loadFileType is not None:
            loadFileTypes = loadFileType
        sources = SampleDataLogic.sampleDataSourcesByCategory()
        sources.setdefault(category, [])
        source = SampleDataSource(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                  thumbnailFileName=thumbnailFileName, loadFileTypes=loadFileTypes, loadFiles=loadFiles,
                                  loadFileProperties=loadFileProperties, checksums=checksums,
                                  customDownloader=customDownloader)
        if SampleDataLogic.isSampleDataSourceRegistered(category, source):
            return
        sources[category].append(source)

    @staticmethod
    def sampleDataSourcesByCategory(category=None):
        if not hasattr(slicer.modules, "sampleDataSources"):
            slicer.modules.sampleDataSources = {}
        if category is None:
            return slicer.modules.sampleDataSources
        return slicer.modules.sampleDataSources.get(category, [])

    @staticmethod
    def isSampleDataSourceRegistered(category, sampleDataSource):
        if not isinstance(sampleDataSource, SampleDataSource):
            raise TypeError(f"unsupported sampleDataSource type '{type(sampleDataSource)}'")
        return sampleDataSource in SampleDataLogic.sampleDataSourcesByCategory().get(category, [])


def click(source):
    """A category button's clicked(): the custom downloader when the source has one (Slicer ignores its result)."""
    if source.customDownloader:
        return source.customDownloader(source)
    raise NotImplementedError("the stand-in does not download: only custom downloaders are run")
