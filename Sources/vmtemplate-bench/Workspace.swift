import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a benchmark runs: a store holding the template, a scratch directory for the QEMUs the
/// bench starts itself, the template's manifest, and the `vmtemplate` binary to time.
struct Workspace: Sendable {
    /// Removed at the end; every QEMU the bench starts itself keeps its sockets and logs here.
    let scratch: String
    let store: TemplateStore
    let template: EntityName
    let published: PublishedTemplate
    let manifest: TemplateManifest
    let memoryFile: String
    let stateFile: String
    let qemuPath: String
    let memoryOptions: MemoryBackendOptions
    let vmtemplate: String
    let host: HostFacts

    /// The `-name` of every QEMU the bench starts itself.
    static let benchQEMUName = "vmtemplate-bench"

    struct Options: Sendable {
        var storePath: String?
        var templateName: String
        var recipePath: String?
        var vmtemplatePath: String?
    }

    /// Creates the scratch directory, opens (or makes) the store, and makes the template if the
    /// store does not have it yet.
    static func prepare(_ options: Options, log: Log) async throws -> Workspace {
        var template = Array("/tmp/vmtb-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("mkdtemp: \(String(cString: strerror(errno)))") }
        let scratch = String(cString: made)
        Cleanup.shared.own(scratchDirectory: scratch)

        let vmtemplate = try options.vmtemplatePath ?? Self.siblingBinary("vmtemplate")
        guard FileManager.default.isExecutableFile(atPath: vmtemplate) else {
            throw BenchError("no vmtemplate binary at \(vmtemplate): build it first (swift build -c release --scratch-path .build-bench), or pass --vmtemplate")
        }

        // A temporary store lives in the scratch directory, so it goes with it.
        let store = try TemplateStore(root: options.storePath ?? "\(scratch)/store")
        Cleanup.shared.watch(store: store)
        let name = try EntityName(options.templateName)
        if !store.templateExists(name) {
            let recipePath = try options.recipePath ?? Self.defaultRecipe()
            log.note("creating template \(name) in \(store.root) from \(recipePath) (TCG)")
            let qemu = try QEMUBinary.probe(path: try QEMUBinary.locate(explicit: nil))
            let creator = TemplateCreator(store: store, qemu: qemu, kvm: .probe())
            _ = try await creator.create(CreateRequest(name: name, recipe: try Recipe.load(path: recipePath), accelerator: .tcg))
        }
        let published = try store.template(named: name)
        let manifest = published.manifest
        guard manifest.machine.accelerator == .tcg else {
            throw BenchError("template \(name) uses \(manifest.machine.accelerator.rawValue); these benchmarks are for TCG: use a store without it, or another --template")
        }
        let qemuPath = try QEMUBinary.locate(explicit: manifest.qemu.path)
        let capabilities = try manifest.qemu.capabilities ?? QEMUBinary.probe(path: qemuPath).capabilities
        return Workspace(
            scratch: scratch, store: store, template: name, published: published, manifest: manifest,
            memoryFile: published.memoryPath,
            stateFile: published.statePath,
            qemuPath: qemuPath,
            memoryOptions: try CloneLauncher.memoryOptions(capabilities: capabilities, allowWritableTemplate: false).options,
            vmtemplate: vmtemplate,
            host: HostFacts.current(qemuPath: qemuPath)
        )
    }

    /// `NAME` next to this executable (`swift build` puts all products in one directory).
    private static func siblingBinary(_ name: String) throws -> String {
        let executable = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        return URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent(name).path
    }

    /// templates/busybox/template.json of the working directory, else of this checkout.
    private static func defaultRecipe() throws -> String {
        let relative = "templates/busybox/template.json"
        let candidates = [
            FileManager.default.currentDirectoryPath + "/" + relative,
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(relative).path,
        ]
        guard let found = candidates.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw BenchError("cannot find \(relative): run from the checkout, or pass --recipe")
        }
        return found
    }

    /// A fresh directory for one QEMU the bench starts itself.
    func newInstanceDirectory() throws -> String {
        let directory = "\(scratch)/vm-\(UUID().uuidString.prefix(8).lowercased())"
        guard mkdir(directory, 0o755) == 0 else { throw BenchError("mkdir \(directory): \(String(cString: strerror(errno)))") }
        return directory
    }

    // MARK: Command lines

    /// The arguments `clone` gives QEMU, from the launcher itself (`CloneLauncher.commandLine`):
    /// same machine, memory backend, sandbox and translation cache, `-incoming defer` (or `launch`),
    /// a fresh vmgenid; only the name and the paths are the bench's.
    func cloneArguments(paths: InstancePaths, launch: LaunchMode = .incoming) throws -> [String] {
        try CloneLauncher.commandLine(for: published, name: Self.benchQEMUName, paths: paths, launch: launch, vmgenid: UUID().uuidString.lowercased(), memoryOptions: memoryOptions, translationCacheMiB: nil).arguments()
    }

    /// The floor: a clone's command line launched paused (`-S`) instead of waiting for a
    /// migration, so it measures QEMU's own start-up (exec, libraries, machine and device set-up,
    /// RAM file mapping, QMP socket) and nothing vmtemplate or the restore adds.
    func floorArguments(paths: InstancePaths) throws -> [String] {
        try cloneArguments(paths: paths, launch: .paused)
    }

    /// Kata's VM factory: the template RAM file opened read-write and mapped private
    /// (`share=off,readonly=off`, no `rom=`), `-S -incoming defer`, and QEMU binding its QMP
    /// socket path itself (`-qmp unix:...`), which the client polls for.
    /// Kata's own command line, not vmtemplate's: no sandbox (its migration spawns `cat`), QEMU's
    /// default translation cache.
    func kataArguments(paths: InstancePaths) throws -> [String] {
        try QEMUCommandLine(
            name: Self.benchQEMUName,
            machine: manifest.machine,
            memory: MemoryBackendFile(path: memoryFile, sizeBytes: manifest.machine.memoryBytes, options: .writableClone),
            paths: paths,
            launch: .incoming,
            vmgenidGUID: UUID().uuidString.lowercased(),
            qmp: .socketPath
        ).arguments() + ["-S"]
    }

    /// The template VM's own boot (kernel + initrd), but with private anonymous RAM
    /// (`memory-backend-ram`), as an ordinary VM has.
    func coldBootArguments(paths: InstancePaths) throws -> [String] {
        let boot = KernelBoot(kernel: manifest.boot.kernel.path, initrd: manifest.boot.initrd?.path, append: manifest.boot.append)
        let backend = MemoryBackendFile(path: "\(scratch)/unused", sizeBytes: manifest.machine.memoryBytes, options: .template)
        var arguments = try QEMUCommandLine(name: Self.benchQEMUName, machine: manifest.machine, memory: backend, paths: paths, launch: .boot(boot)).arguments()
        let objectValue = try backend.objectArgument()
        guard let index = arguments.firstIndex(of: objectValue) else {
            throw BenchError("the template command line has no memory-backend-file object: QEMUCommandLine changed; update the bench")
        }
        arguments[index] = "memory-backend-ram,id=\(backend.id),size=\(manifest.machine.memoryBytes)"
        return arguments
    }
}

/// Progress on stderr, so that `--json` output on stdout stays clean.
struct Log: Sendable {
    func note(_ message: String) {
        FileHandle.standardError.write(Data("vmtemplate-bench: \(message)\n".utf8))
    }
}
