import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What to create.
public struct CreateRequest: Sendable {
    public var name: EntityName
    public var recipe: Recipe
    public var accelerator: AcceleratorChoice
    /// Overrides the recipe's ready timeout.
    public var readyTimeout: Duration?
    /// Restrict the template to a group: files 0440 and directory 0550 of that group, instead of
    /// readable by everyone (guest RAM holds whatever the guest had in memory when it was saved).
    public var group: String?

    public init(name: EntityName, recipe: Recipe, accelerator: AcceleratorChoice = .auto, readyTimeout: Duration? = nil, group: String? = nil) {
        self.group = group
        self.name = name
        self.recipe = recipe
        self.accelerator = accelerator
        self.readyTimeout = readyTimeout
    }
}

/// The phases `create` goes through, reported as they start.
public enum CreatePhase: String, Sendable, CaseIterable {
    case boot, ready, pause, save, digest, publish
}

/// Makes templates: boots the guest with its RAM in a file, waits until it is ready, pauses it,
/// saves its device state without its RAM (`x-ignore-shared`), and publishes RAM + state + manifest.
public struct TemplateCreator: Sendable {
    public let store: TemplateStore
    public let qemu: QEMUBinary
    public let kvm: KVMProbe

    /// Space kept free beyond the RAM file, for the device state (a few hundred KB) and manifest.
    static let stateReserveBytes: UInt64 = 8 * 1024 * 1024
    static let minimumMemoryBytes: UInt64 = 16 * 1024 * 1024

    public init(store: TemplateStore, qemu: QEMUBinary, kvm: KVMProbe) {
        self.store = store
        self.qemu = qemu
        self.kvm = kvm
    }

    /// Creates the template. On any failure the staging area and its QEMU are removed: no partial
    /// template is ever published, and no QEMU is left running.
    public func create(_ request: CreateRequest, progress: @Sendable (CreatePhase) -> Void = { _ in }) async throws -> TemplateManifest {
        let started = ContinuousClock.now
        let plan = try prepare(request)
        let access = try TemplateAccess(group: request.group)
        let staging = try await store.reserveStaging(request.name)
        var instance: QEMUInstance?
        do {
            let manifest = try await run(plan, request: request, access: access, staging: staging, started: started, progress: progress) { instance = $0 }
            return manifest
        } catch {
            // The same clean-up for a failure and for an interruption (a cancelled task).
            let launched = instance
            await uncancellable {
                if let launched { _ = try? await launched.stop(grace: .milliseconds(500), politely: false) }
                staging.discard()
            }
            throw error
        }
    }

    // MARK: Checks before anything touches the disk

    struct Plan {
        var machine: MachineSpec
        var boot: KernelBoot
        var kernelReference: TemplateManifest.FileReference
        var initrdReference: TemplateManifest.FileReference?
        var diskReferences: [TemplateManifest.FileReference]
        var migration: MigrationTransport
    }

    func prepare(_ request: CreateRequest) throws -> Plan {
        let recipe = request.recipe
        guard qemu.capabilities.supportsIgnoreShared, qemu.capabilities.supportsMachineMemoryBackend else {
            throw VMTemplateError(.unsupported, "QEMU \(qemu.version) at \(qemu.path) is too old for templates (needs >= 5.0, and >= 8.2 for read-only clones): run scripts/setup or pass --qemu with a newer one.")
        }
        let memory = try ByteSize(parsing: recipe.memory)
        guard memory.bytes >= Self.minimumMemoryBytes else {
            throw VMTemplateError(.invalidArgument, "memory \(recipe.memory) is too small: give at least 16M (the busybox guest needs 128M or more).")
        }
        guard memory.bytes % (1024 * 1024) == 0 else {
            throw VMTemplateError(.invalidArgument, "memory \(recipe.memory) is not a whole number of MiB: give e.g. 256M.")
        }
        if let available = try? MemInfo.read().availableBytes, memory.bytes > available {
            throw VMTemplateError(.invalidArgument, "memory \(memory) is more than this machine has free (\(ByteSize(bytes: available))): give a smaller --memory.")
        }
        guard recipe.readyTimeoutSeconds > 0, recipe.readyTimeoutSeconds <= 86_400 else {
            throw VMTemplateError(.invalidArgument, "ready_timeout_seconds \(recipe.readyTimeoutSeconds) is out of range: give 1 to 86400.")
        }
        guard (0...32).contains(recipe.hotplugSlots) else {
            throw VMTemplateError(.invalidArgument, "hotplug_slots \(recipe.hotplugSlots) is out of range: give 0 to 32.")
        }
        guard (1...64).contains(recipe.cpus) else {
            throw VMTemplateError(.invalidArgument, "cpus \(recipe.cpus) is out of range: give 1 to 64.")
        }
        try recipe.checkGuestAgentSettings()
        if (!recipe.disks.isEmpty || recipe.needsGuestAgent) && recipe.hotplugSlots > MachineSpec.maxHotplugSlotsWithFixedDevices {
            throw VMTemplateError(.invalidArgument, "hotplug_slots \(recipe.hotplugSlots) leaves no room for the recipe's disks and guest agent: give at most \(MachineSpec.maxHotplugSlotsWithFixedDevices).")
        }
        let accelerator = try Accelerator.resolve(request.accelerator, kvm: kvm)
        let machineType = try qemu.resolveMachineType(recipe.machine)
        if (!recipe.disks.isEmpty || recipe.needsGuestAgent) && !machineType.contains("q35") {
            throw VMTemplateError(.invalidArgument, "disks and the guest agent sit on a PCIe root bus, which \(machineType) has not: set \"machine\": \"q35\".")
        }
        if recipe.hotplugSlots > 0 && !machineType.contains("q35") {
            throw VMTemplateError(.invalidArgument, "hotplug_slots needs a PCIe machine (q35), not \(machineType): set \"hotplug_slots\": 0 or \"machine\": \"q35\".")
        }
        let kernelReference = try Self.reference(recipe.kernel, what: "kernel")
        let initrdReference = try recipe.initrd.map { try Self.reference($0, what: "initrd") }
        var diskReferences: [TemplateManifest.FileReference] = []
        var diskBytes: UInt64 = 0
        for (index, disk) in recipe.disks.enumerated() {
            // The same checks as a clone's --disk: no link followed, the format it says, no
            // backing file of its own.
            let image: DiskImage
            do {
                image = try DiskImage.open(path: disk.path, format: disk.format, writable: false)
            } catch let error as VMTemplateError {
                // One line: the recipe's key instead of --disk's option.
                throw VMTemplateError(error.code, "recipe disk \(index): " + error.message.replacingOccurrences(of: "check path=.", with: "fix disks[\(index)].path in the recipe."))
            }
            defer { close(image.descriptor) }
            var info = stat()
            if fstat(image.descriptor, &info) == 0 { diskBytes += UInt64(max(0, info.st_blocks)) * 512 }
            diskReferences.append(try Self.reference(disk.path, what: "recipe disk \(index)"))
        }

        let needed = memory.bytes + diskBytes + Self.stateReserveBytes
        if let free = try? FileSystem.availableBytes(onFileSystemOf: store.root), free < needed {
            throw VMTemplateError(.ioError, "not enough disk space in store '\(store.root)': the template needs \(ByteSize(bytes: needed)), \(ByteSize(bytes: free)) is free. Free some space or use another --store.")
        }
        return Plan(
            machine: MachineSpec(machineType: machineType, machineOptions: recipe.machineOptions, cpuModel: recipe.cpuModel, cpus: recipe.cpus, memoryBytes: memory.bytes, accelerator: accelerator, vmgenid: recipe.vmgenid, hotplugSlots: recipe.hotplugSlots,
                                 bootDisks: recipe.disks.map { BootDisk(format: $0.format, mode: $0.mode) }, guestAgent: recipe.needsGuestAgent),
            boot: KernelBoot(kernel: recipe.kernel, initrd: recipe.initrd, append: recipe.append),
            kernelReference: kernelReference,
            initrdReference: initrdReference,
            diskReferences: diskReferences,
            migration: MigrationTransport(capabilities: qemu.capabilities)
        )
    }

    static func reference(_ path: String, what: String) throws -> TemplateManifest.FileReference {
        let status: FileStatus
        do {
            status = try FileStatus.read(path: path)
        } catch {
            throw VMTemplateError(.notFound, "\(what) '\(path)' does not exist: build the guest first (templates/busybox/build, or scripts/setup) or fix the path in the recipe.")
        }
        guard status.isRegularFile, access(path, R_OK) == 0 else {
            throw VMTemplateError(.invalidArgument, "\(what) '\(path)' is not a readable file: check its permissions.")
        }
        return .init(path: path, sizeBytes: status.sizeBytes, sha256: try FileDigest.sha256(path: path))
    }

    // MARK: The flow

    private func run(_ plan: Plan, request: CreateRequest, access: TemplateAccess, staging: StagingArea, started: ContinuousClock.Instant, progress: @Sendable (CreatePhase) -> Void, onLaunch: (QEMUInstance) -> Void) async throws -> TemplateManifest {
        var timings = CreateTimings()
        let paths = staging.paths
        let files = staging.files
        try paths.checkSocketLengths()
        try FileSystem.allocateFile(path: files.memoryPath, size: plan.machine.memoryBytes, mode: 0o600)
        // The guest boots from the template's own copies of its disks: what it writes while it
        // boots lands in them (never in the recipe's files), and they are what every clone sees.
        var bootDisks: [BootDiskFiles] = []
        for (index, disk) in request.recipe.disks.enumerated() {
            let copy = "\(staging.directory)/\(TemplateManifest.diskFileName(index, format: disk.format))"
            let source = try DiskImage.open(path: disk.path, format: disk.format, writable: false)
            defer { close(source.descriptor) }
            try FileSystem.copySparse(from: source.descriptor, toNewFile: copy, mode: 0o600)
            // The copy is what QEMU opens: checked again, since whoever may write the recipe's
            // file could have changed its header between the check and the copy.
            close(try DiskImage.open(path: copy, format: disk.format, writable: false).descriptor)
            bootDisks.append(BootDiskFiles(image: copy, imageWritable: disk.mode == .overlay, overlay: nil))
        }

        progress(.boot)
        let commandLine = QEMUCommandLine(
            name: staging.qemuName,
            machine: plan.machine,
            memory: MemoryBackendFile(path: files.memoryPath, sizeBytes: plan.machine.memoryBytes, options: .template),
            paths: paths,
            launch: .boot(plan.boot),
            // No user drop: QEMU writes the device state into the owner's staging area after it
            // has started, which another user cannot.
            confinement: .forThisProcess(version: qemu.version, userMayRead: false, denySpawn: plan.migration == .file),
            bootDisks: bootDisks
        )
        let arguments = try commandLine.arguments()
        let qemuInstance = try QEMUInstance.launch(arguments: arguments, name: commandLine.name, paths: paths, qmp: commandLine.qmp, executable: qemu.path)
        onLaunch(qemuInstance)
        try staging.writeOwner(qemu: qemuInstance.identity, executable: qemuInstance.executable ?? qemu.path)

        let qmp = try await qemuInstance.connectQMP(timeout: .seconds(30))
        defer { qmp.close() }

        progress(.ready)
        let bootStarted = ContinuousClock.now
        try await waitUntilReady(request: request, plan: plan, paths: paths, qemu: qemuInstance)
        timings.bootToReady = bootStarted.duration(to: .now).seconds

        progress(.pause)
        let pauseStarted = ContinuousClock.now
        try await qmp.stop()
        timings.pause = pauseStarted.duration(to: .now).seconds

        progress(.save)
        let saveStarted = ContinuousClock.now
        try await save(qmp: qmp, qemu: qemuInstance, staging: staging, transport: plan.migration)
        try await qemuInstance.stop(grace: .seconds(5), qmp: qmp)
        try FileSystem.fsyncFile(path: files.memoryPath)
        try FileSystem.fsyncFile(path: files.statePath)
        for disk in bootDisks { try FileSystem.fsyncFile(path: disk.image) }
        timings.save = saveStarted.duration(to: .now).seconds

        progress(.digest)
        let digestStarted = ContinuousClock.now
        try access.apply(to: files.memoryPath)
        try access.apply(to: files.statePath)
        let memory = try Self.storedFile(files.memoryPath, name: "memory")
        let state = try Self.storedFile(files.statePath, name: "state")
        var disks: [TemplateManifest.StoredFile] = []
        for disk in bootDisks {
            try access.apply(to: disk.image)
            disks.append(try Self.storedFile(disk.image, name: FileSystem.split(disk.image).name))
        }
        timings.digest = digestStarted.duration(to: .now).seconds

        progress(.publish)
        let publishStarted = ContinuousClock.now
        try tidy(staging, access: access)
        var manifest = TemplateManifest(
            formatVersion: TemplateManifest.currentFormatVersion,
            name: request.name.value,
            createdAt: Date(),
            qemu: .init(path: qemu.path, version: qemu.version, package: qemu.package, capabilities: qemu.capabilities, binary: try? .init(FileStatus.read(path: qemu.path))),
            machine: plan.machine,
            boot: .init(kernel: plan.kernelReference, initrd: plan.initrdReference, append: plan.boot.append, disks: plan.diskReferences.isEmpty ? nil : plan.diskReferences),
            readyMarker: request.recipe.readyMarker,
            memory: memory,
            state: state,
            migration: .init(capabilities: ["x-ignore-shared"], uriScheme: plan.migration.rawValue),
            templateArguments: arguments,
            timings: timings,
            guestClock: request.recipe.guestClock,
            disks: disks.isEmpty ? nil : disks,
            readyWhen: request.recipe.readyWhen == .marker ? nil : request.recipe.readyWhen,
            guestCommands: request.recipe.guestCommands.isEmpty ? nil : request.recipe.guestCommands
        )
        // The manifest carries its own timings, so the publish phase is measured up to its write.
        manifest.timings.publish = publishStarted.duration(to: .now).seconds
        manifest.timings.total = started.duration(to: .now).seconds
        try StoredJSON.write(manifest, to: files.manifestPath, mode: access.fileMode)
        try access.apply(to: files.manifestPath)
        try await store.publish(staging, directoryMode: access.directoryMode)
        if let gid = access.groupID { chown(store.templateFiles(request.name).directory, uid_t.max, gid) }
        return manifest
    }

    private func waitUntilReady(request: CreateRequest, plan: Plan, paths: InstancePaths, qemu: QEMUInstance) async throws {
        let timeout = request.readyTimeout ?? .seconds(fractional: request.recipe.readyTimeoutSeconds)
        if request.recipe.readyWhen == .guestAgent {
            return try await waitForAgent(request: request, timeout: timeout, paths: paths, qemu: qemu)
        }
        let watcher = SerialConsoleWatcher(path: paths.serialLog)
        // The console log and the guest's RAM are written to the staging area while the guest
        // boots; once its file system is full neither can be, and the marker never comes.
        let directory = FileSystem.split(paths.serialLog).directory
        let diskFull: @Sendable () -> VMTemplateError? = {
            guard let free = try? FileSystem.availableBytes(onFileSystemOf: directory), free < Self.fullWhileBootingBelowBytes else { return nil }
            return VMTemplateError(.ioError, "the file system of '\(directory)' is full (\(ByteSize(bytes: free)) free) while the guest boots: its console log and RAM cannot be written. Free some space or use another --store, then create it again.")
        }
        let ready: Bool
        do {
            ready = try await watcher.waitForMarker(request.recipe.readyMarker, timeout: timeout, isAlive: { qemu.isRunning }, problem: diskFull)
        } catch let error as VMTemplateError where error.code == .timeout {
            let consoleTail = LogTail.lastLines(ofFile: paths.serialLog, count: 15)
            var advice = "check the recipe's kernel, initrd and append line"
            if plan.machine.accelerator == .kvm { advice += ", or try --accel tcg (this KVM may not run stock kernels)" }
            throw VMTemplateError(
                .timeout,
                "guest did not print its ready marker '\(request.recipe.readyMarker)' within \(timeout): \(advice). Last lines of its console:",
                detail: consoleTail.isEmpty ? "(the console printed nothing)" : consoleTail
            )
        }
        if !ready {
            // A guest RAM page that cannot be allocated kills QEMU (SIGBUS): say why.
            if let full = diskFull() { throw full }
            throw await qemu.exitError(during: "boot") ?? VMTemplateError(.qemuFailed, "QEMU stopped during boot.")
        }
    }

    /// Waits until the guest's agent answers, then runs the recipe's `ready_commands` through it,
    /// each to exit 0, all within the ready timeout. The connection is closed before the guest is
    /// paused: the agent is left waiting for its next client, as in every clone.
    private func waitForAgent(request: CreateRequest, timeout: Duration, paths: InstancePaths, qemu: QEMUInstance) async throws {
        let deadline = ContinuousClock.now + timeout
        let commands = request.recipe.readyCommands
        let socket = paths.agentSocket
        let isAlive: @Sendable () -> Bool = { qemu.isRunning }
        do {
            try await onOwnThread {
                let agent = try GuestAgentConnection.connect(path: socket)
                defer { agent.close() }
                try agent.synchronize(until: deadline, isAlive: isAlive)
                for command in commands {
                    let result = try agent.run(command, until: deadline)
                    guard result.succeeded else {
                        throw VMTemplateError(.qemuFailed, "ready_commands entry '\(TerminalText.escape(command.joined(separator: " ")))' \(result.ending) in the guest (it said: '\(result.lastWords)'): fix the guest or the command; the guest must be quiet before it is paused (docs/guests.md).")
                    }
                }
            }
        } catch let error as VMTemplateError where error.code == .timeout {
            let consoleTail = LogTail.lastLines(ofFile: paths.serialLog, count: 15)
            throw VMTemplateError(
                .timeout,
                "the guest agent did not answer\(commands.isEmpty ? "" : ", or ready_commands did not finish,") within \(timeout): install qemu-guest-agent in the guest and make sure its unit starts (ready_when is \"guest-agent\"), or raise ready_timeout_seconds. Last lines of its console:",
                detail: consoleTail.isEmpty ? "(the console printed nothing)" : consoleTail
            )
        } catch let error as VMTemplateError where error.code == .qemuFailed && !qemu.isRunning {
            throw await qemu.exitError(during: "boot") ?? error
        }
    }

    /// Less free space than this on the staging area's file system while the guest boots is a
    /// full disk: a few pages of RAM or of console log are all that is left.
    static let fullWhileBootingBelowBytes: UInt64 = 16 * 1024
    /// Less free space than this after a failed save: the device state did not fit.
    static let fullBelowBytes: UInt64 = 64 * 1024

    /// Saves the device state; the RAM stays in the shared file (`x-ignore-shared`).
    private func save(qmp: QMPClient, qemu: QEMUInstance, staging: StagingArea, transport: MigrationTransport) async throws {
        // `events` makes QEMU announce each migration state, so completion is awaited, not polled.
        try await qmp.migrateSetCapabilities(["x-ignore-shared": true, "events": true])
        do {
            try await qmp.migrate(uri: transport.saveURI(to: staging.files.statePath))
            _ = try await qmp.waitForMigration(timeout: .seconds(120))
        } catch {
            if let free = try? FileSystem.availableBytes(onFileSystemOf: staging.directory), free < Self.fullBelowBytes {
                throw VMTemplateError(.ioError, "disk full while saving the template's device state in '\(store.root)': free some space or use another --store, then create it again.", cause: error)
            }
            throw await qemu.exitError(during: "save") ?? VMTemplateError(.qemuFailed, "saving the device state failed.", cause: error)
        }
    }

    /// Leaves only the template's own files: the console log is kept as `boot.log`.
    private func tidy(_ staging: StagingArea, access: TemplateAccess) throws {
        let paths = staging.paths
        let bootLog = staging.files.bootLogPath
        if rename(paths.serialLog, bootLog) == 0 { try access.apply(to: bootLog) }
        for leftover in [paths.qmpSocket, paths.controlSocket, paths.agentSocket, paths.qemuLog, "\(staging.directory)/owner.json"] {
            unlink(leftover)
        }
    }

    static func storedFile(_ path: String, name: String) throws -> TemplateManifest.StoredFile {
        let digest = try FileDigest.sha256(path: path)
        let status = try FileStatus.read(path: path)
        return .init(name: name, sizeBytes: status.sizeBytes, sha256: digest, mode: status.mode, inode: status.inode, modifiedNanoseconds: status.modifiedNanoseconds)
    }
}

/// Who may read a template: everybody (0444 files, 0555 directory), or one group (0440, 0550).
struct TemplateAccess {
    let groupID: gid_t?

    init(group: String?) throws {
        guard let group else {
            groupID = nil
            return
        }
        guard let entry = getgrnam(group) else {
            throw VMTemplateError(.invalidArgument, "there is no group '\(TerminalText.escape(group))': create it (groupadd) or pick an existing one for --group.")
        }
        groupID = entry.pointee.gr_gid
    }

    var fileMode: mode_t { groupID == nil ? 0o444 : 0o440 }
    var directoryMode: mode_t { groupID == nil ? 0o555 : 0o550 }

    func apply(to path: String) throws {
        if let groupID, chown(path, uid_t.max, groupID) != 0 {
            throw FileSystem.error("give the group to", path: path, code: errno, permissionNeeded: "only root or a member of the group can give a file to it")
        }
        try FileSystem.setMode(path: path, mode: fileMode)
    }
}
