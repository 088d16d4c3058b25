import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Starts a clone's QEMU from a template and restores it, paused: the clone is reserved
/// (admission, names, its directory and first record, under the store lock), QEMU started with
/// the template's machine and its RAM file mapped `share=off,readonly=on,rom=off` (opened
/// read-only, mapped private: the guest's writes become copy-on-write pages of the clone, the file
/// never changes) and `-incoming defer`, the device state loaded with `x-ignore-shared`, and the
/// requested NICs and disks attached. It knows nothing of pools or of what runs the guest next:
/// ``CloneEngine`` resumes a launched clone for a caller, ``WarmPool`` warms one for its pool.
public struct CloneLauncher: Sendable {
    /// Where clone records live; this user's own.
    public let store: TemplateStore
    /// Where templates are read from: the same store, or another user's (`--template-store`,
    /// opened read-only: a non-root user clones root's templates into a store of their own).
    public let templates: TemplateStore
    /// `--qemu`/`$VMTEMPLATE_QEMU` if given; otherwise the binary that made the template.
    public let explicitQEMU: String?

    public init(store: TemplateStore, templates: TemplateStore? = nil, explicitQEMU: String? = nil) {
        self.store = store
        self.templates = templates ?? store
        self.explicitQEMU = explicitQEMU
    }

    /// A clone restored and paused, its QMP connection open (the caller closes it, and either
    /// resumes the clone or ``discard(_:)``s it).
    public struct Launched: Sendable {
        public var record: CloneRecord
        public let qemu: QEMUInstance
        public let qmp: QMPClient
        public let template: PublishedTemplate
        /// What the start cost so far; the caller adds its resume and records.
        public var timings: CloneTimings
        var lap: Lap
        public let started: ContinuousClock.Instant
        /// Said to the user once (a template opened read-write).
        public let warning: String?
    }

    /// The template `name`, from a store this process may take a QEMU binary's path from.
    public func template(_ name: EntityName) throws -> PublishedTemplate {
        // A template's manifest names the QEMU binary that runs it and the files it maps: only a
        // store of root's or of this user's may say that to this process.
        guard templates.ownerUID == 0 || templates.ownerUID == geteuid() else {
            throw VMTemplateError(.permissionDenied, "template store '\(templates.root)' belongs to uid \(templates.ownerUID): clone only from root's store or your own (a template names the QEMU that runs it).")
        }
        return try templates.template(named: name)
    }

    /// Reserves, spawns, restores and attaches: returns the clone restored and paused, recorded
    /// in `state` (`starting` for a caller's clone, `warming` for a pool member). On any failure
    /// or cancellation nothing is left: no QEMU, no directory, no name.
    public func launch(_ request: CloneRequest, from template: PublishedTemplate, state: CloneState, started: ContinuousClock.Instant = .now) async throws -> Launched {
        let manifest = template.manifest
        try checkFiles(of: template)
        let (qemuPath, capabilities) = try qemuFor(manifest)
        let (memoryOptions, warning) = try Self.memoryOptions(capabilities: capabilities, allowWritableTemplate: request.allowWritableTemplate)
        if request.freshGenerationID && !manifest.machine.vmgenid {
            throw VMTemplateError(.unsupported, "template '\(manifest.name)' has no vmgenid device, so its clones cannot get fresh generation IDs: pass --no-vmgenid, or create the template with \"vmgenid\": true.")
        }

        var record = try await reserve(request, template: template, state: state, executable: qemuPath, writable: memoryOptions.readonly == false)
        var lap = Lap(from: started)
        var timings = CloneTimings()
        timings.admission = lap.next()
        var instance: QEMUInstance?
        do {
            let paths = store.clonePaths(record.id)
            try paths.checkSocketLengths()
            try Self.createBootDiskOverlays(for: template, paths: paths)
            let commandLine = try self.commandLine(for: template, cloneID: record.id, vmgenid: record.vmgenid, memoryOptions: memoryOptions, translationCacheMiB: request.tcgTranslationCacheMiB)
            let arguments = try commandLine.arguments()
            // Taps, images and overlays are opened and made before QEMU starts: a wrong --nic or
            // --disk costs no QEMU.
            let devices = try CloneDevices.open(request.devices, cloneID: record.id, cloneDirectory: store.cloneDirectory(record.id), existing: [], slots: manifest.machine.hotplugSlots)
            defer { for device in devices { device.closeDescriptors() } }
            let qemu = try QEMUInstance.launch(arguments: arguments, name: commandLine.name, paths: paths, qmp: commandLine.qmp, executable: qemuPath, transparentHugePages: false)
            instance = qemu
            record.qemu = qemu.identity
            record.qemuExecutable = qemu.executable ?? qemuPath
            record.qemuArguments = arguments
            record.hotplugSlots = manifest.machine.hotplugSlots
            record.guestAgent = manifest.machine.guestAgent ? true : nil
            timings.spawn = lap.next()

            // QEMU needs ~20 ms to build the machine and answer; the record is written meanwhile.
            let spawnedRecord = record
            async let connected = restore(template, into: qemu, cloneID: spawnedRecord.id, timeout: request.timeout)
            try store.save(spawnedRecord)
            let (qmp, loaded) = try await connected
            do {
                // Backends (taps, disks) are no part of the device state: they go in while it loads.
                var attached: [AttachedDevice] = []
                let backendsStarted = ContinuousClock.now
                for device in devices {
                    attached.append(try await qmp.addBackend(device, timeout: request.timeout))
                }
                let backends = backendsStarted.duration(to: .now).seconds
                try await loaded()
                timings.restore = max(0, lap.next() - backends)
                // Devices go in after the device state is loaded (it would overwrite the root
                // ports' state) and before the guest runs, so it finds them as it resumes.
                for device in attached {
                    try await qmp.addFrontend(device, timeout: request.timeout)
                }
                record.devices = attached.isEmpty ? nil : attached
                record.devicesReady = attached.isEmpty ? nil : false
                timings.devices = backends + lap.next()
            } catch {
                qmp.close()
                throw error
            }
            return Launched(record: record, qemu: qemu, qmp: qmp, template: template, timings: timings, lap: lap, started: started, warning: warning)
        } catch {
            // The same clean-up for a failure and for an interruption (a cancelled task).
            await discard(record, qemu: instance)
            throw error
        }
    }

    /// Stops a launched clone that will not be used (its caller failed or was cancelled after
    /// ``launch(_:from:state:started:)`` returned) and removes it: QMP closed, QEMU killed, its
    /// directory, names and index entry gone.
    public func discard(_ launched: Launched) async {
        launched.qmp.close()
        await discard(launched.record, qemu: launched.qemu)
    }

    private func discard(_ record: CloneRecord, qemu: QEMUInstance?) async {
        await uncancellable {
            if let qemu { _ = try? await qemu.stop(grace: .milliseconds(500), politely: false) }
            try? await store.withLock { try $0.removeCloneDirectory(record.id, record: record, reason: "failed-start") }
        }
    }

    /// The clone's QEMU command line: the template's machine, its RAM file mapped private and
    /// read-only, waiting for its device state (`-incoming defer`), sandboxed as this process
    /// requires. The bench starts its floor QEMUs from exactly this.
    package func commandLine(for template: PublishedTemplate, cloneID: String, vmgenid: String?, memoryOptions: MemoryBackendOptions, translationCacheMiB: Int?) throws -> QEMUCommandLine {
        Self.commandLine(for: template, name: CloneRecord.qemuName(id: cloneID), paths: store.clonePaths(cloneID), vmgenid: vmgenid, memoryOptions: memoryOptions, translationCacheMiB: translationCacheMiB)
    }

    /// ``commandLine(for:cloneID:vmgenid:memoryOptions:translationCacheMiB:)`` with its name,
    /// paths and launch given: the seam the benchmark starts its own QEMUs through (a paused
    /// launch for its floor, a QMP socket path for its Kata-style runner), so that what it measures
    /// is this command line, sandbox and cache size included.
    package static func commandLine(for template: PublishedTemplate, name: String, paths: InstancePaths, launch: LaunchMode = .incoming, vmgenid: String?, memoryOptions: MemoryBackendOptions, translationCacheMiB: Int?, qmp: QMPEndpoint = .inheritedListener) -> QEMUCommandLine {
        let manifest = template.manifest
        return QEMUCommandLine(
            name: name,
            machine: manifest.machine,
            memory: MemoryBackendFile(path: template.memoryPath, sizeBytes: manifest.machine.memoryBytes, options: memoryOptions),
            paths: paths,
            launch: launch,
            vmgenidGUID: vmgenid ?? "auto",
            tcgTranslationCacheMiB: translationCacheMiB ?? CloneRequest.defaultTranslationCacheMiB,
            qmp: qmp,
            // With `file:` the state is passed as a descriptor, so QEMU's user need not reach it.
            confinement: .forThisProcess(version: manifest.qemu.version, userMayRead: manifest.migration.transport == .file || everyoneMayRead(template.statePath), denySpawn: manifest.migration.transport == .file),
            bootDisks: bootDiskFiles(for: template, paths: paths)
        )
    }

    /// What a clone's QEMU opens for each boot disk: the template's copy, read-only, and for an
    /// `overlay` disk the clone's own overlay over it.
    static func bootDiskFiles(for template: PublishedTemplate, paths: InstancePaths) -> [BootDiskFiles] {
        zip(template.manifest.machine.bootDisks, template.diskPaths).enumerated().map { index, pair in
            BootDiskFiles(image: pair.1, imageWritable: false, overlay: pair.0.mode == .overlay ? paths.bootDiskOverlay(index) : nil)
        }
    }

    /// Checks each qcow2 boot disk's header (no backing or data file of its own: QEMU would open
    /// what it names), and writes each `overlay` disk's empty qcow2 overlay (``QCOW2Overlay``, no
    /// qemu-img) into the clone's directory; it goes with the directory.
    static func createBootDiskOverlays(for template: PublishedTemplate, paths: InstancePaths) throws {
        for (index, (disk, image)) in zip(template.manifest.machine.bootDisks, template.diskPaths).enumerated() where disk.mode == .overlay || disk.format == .qcow2 {
            let opened = try DiskImage.open(path: image, format: disk.format, writable: false)
            close(opened.descriptor)
            guard disk.mode == .overlay else { continue }
            let overlay = try opened.createOverlay(at: paths.bootDiskOverlay(index))
            close(overlay)
        }
    }

    /// The memory backend a clone gets with these capabilities. Without `rom=` (QEMU < 8.2) the
    /// only private writable mapping opens the file read-write, which is allowed only when asked
    /// for: the template would then be protected by the mapping alone, not by the kernel.
    public static func memoryOptions(capabilities: QEMUCapabilities, allowWritableTemplate: Bool) throws -> (options: MemoryBackendOptions, warning: String?) {
        if capabilities.supportsROM { return (.clone, nil) }
        guard allowWritableTemplate else {
            throw VMTemplateError(.unsupported, "this QEMU has no memory-backend-file rom= (needs 8.2), so a clone could only open the template read-write: install QEMU >= 8.2 (scripts/setup), or pass --allow-writable-template to accept a template protected by the private mapping alone.")
        }
        return (.writableClone, "warning: clones open the template read-write (QEMU < 8.2 has no rom=); only the private mapping keeps guests from changing it. Install QEMU >= 8.2.")
    }

    /// The binary to run and what it can do, checked against the one that made the template.
    package func qemuFor(_ manifest: TemplateManifest) throws -> (path: String, capabilities: QEMUCapabilities) {
        let path = try QEMUBinary.locate(explicit: explicitQEMU ?? manifest.qemu.path)
        // Same file as at create time: trust what was probed then (probing costs two QEMU runs).
        if path == manifest.qemu.path, let recorded = manifest.qemu.binary, let capabilities = manifest.qemu.capabilities,
           let status = try? FileStatus.read(path: path), TemplateManifest.BinaryFingerprint(status) == recorded {
            return (path, capabilities)
        }
        let binary = try QEMUBinary.probe(path: path)
        guard binary.version == manifest.qemu.version else {
            throw VMTemplateError(.unsupported, "template '\(manifest.name)' was made with QEMU \(manifest.qemu.version) but \(path) is QEMU \(binary.version): device state only loads into the same QEMU. Create the template again with this QEMU, or pass --qemu with a \(manifest.qemu.version) binary.")
        }
        return (path, binary.capabilities)
    }

    /// Checks that the template's files are the ones its manifest describes (size, mode, inode,
    /// modification time): a cheap test that catches replaced or rewritten files without hashing.
    public func checkFiles(of template: PublishedTemplate) throws {
        let manifest = template.manifest
        var statuses: [(TemplateManifest.StoredFile, FileStatus)] = []
        for file in manifest.storedFiles {
            // lstat: a template file is never reached through a link.
            guard let status = try? FileStatus.read(path: "\(template.directory)/\(file.name)", followingLinks: false), status.isRegularFile else {
                throw VMTemplateError(.notFound, "template '\(manifest.name)' is missing its \(file.name) file: the template is damaged; remove it and create it again.")
            }
            statuses.append((file, status))
        }
        for (file, status) in statuses {
            var differences: [String] = []
            if status.sizeBytes != file.sizeBytes { differences.append("size \(status.sizeBytes) instead of \(file.sizeBytes)") }
            if status.mode != file.mode { differences.append("mode \(String(status.mode, radix: 8)) instead of \(String(file.mode, radix: 8))") }
            if status.inode != file.inode || status.modifiedNanoseconds != file.modifiedNanoseconds { differences.append("replaced or rewritten since it was made") }
            if !differences.isEmpty {
                throw VMTemplateError(.invalidState, "template '\(manifest.name)': \(file.name) does not match its manifest (\(differences.joined(separator: ", "))): the template was changed, so it cannot be trusted; create it again.")
            }
        }
    }

    /// The fd set the template's device state is passed in.
    package static let stateFDSet = 1

    /// Whether any user may read `path`: the file readable by others and every directory above it
    /// searchable by others (so QEMU, once it has dropped to its own user, can open it).
    static func everyoneMayRead(_ path: String) -> Bool {
        var info = stat()
        guard stat(path, &info) == 0, info.st_mode & 0o004 != 0 else { return false }
        var directory = FileSystem.split(path).directory
        while directory != "/" && directory != "." {
            guard stat(directory, &info) == 0, info.st_mode & 0o001 != 0 else { return false }
            directory = FileSystem.split(directory).directory
        }
        return true
    }

    /// Names are unique among clones and templates, so a name always says which one it is: a clone
    /// may not take the name of a template of this store or of the one it clones from.
    func refuseTemplateName(_ name: String) throws {
        if let asTemplate = try? EntityName(name), store.templateExists(asTemplate) || templates.templateExists(asTemplate) {
            throw VMTemplateError(.exists, "'\(name)' is the name of a template: give the clone another --name.")
        }
    }

    /// Creates the clone's directory and first record under the store lock, so names stay unique.
    private func reserve(_ request: CloneRequest, template: PublishedTemplate, state: CloneState, executable: String, writable: Bool) async throws -> CloneRecord {
        let manifest = template.manifest
        return try await store.withLock { locked in
            // Nothing here reads every record: limits read the live index (``LockedStore/admit(_:excluding:)``),
            // names and IDs the name index (``LockedStore/claimNames(of:)``).
            try Admission.checkLimit(request.cowLimitBytes)
            // A name that is taken is judged before the limits: a retried create of a clone that
            // exists is told so (73, 409), not that the store is full (69, 429).
            if let wanted = request.name?.value {
                try refuseTemplateName(wanted)
                if store.cloneHoldingName(wanted) != nil { throw TemplateStore.nameTaken(wanted) }
            }
            let committed = Admission.committedBytes(guestMemory: manifest.machine.memoryBytes, cowLimit: request.cowLimitBytes)
            try locked.admit(committed)
            var id = CloneRecord.newID()
            while access(store.cloneDirectory(id), F_OK) == 0 { id = CloneRecord.newID() }
            let name = request.name?.value ?? id
            try refuseTemplateName(name)
            let directory = store.cloneDirectory(id)
            // 0755: others may read the record (as they may see a process); logs and sockets
            // inside are the owner's alone.
            guard mkdir(directory, 0o755) == 0 else {
                throw VMTemplateError(.ioError, "cannot create clone directory '\(directory)': \(errnoText()). Check that this user may write to '\(store.clonesDirectory)'.", cause: SystemCallError("mkdir"))
            }
            var record = CloneRecord(
                id: id, name: name, template: manifest.name,
                qemu: nil, qemuExecutable: executable, creator: ProcessIdentity.current(pid: getpid()),
                createdAt: Date(), state: state,
                templateStore: templates.root == store.root ? nil : templates.root,
                memoryFile: template.memoryPath,
                writableTemplate: writable,
                vmgenid: request.freshGenerationID ? UUID().uuidString.lowercased() : nil,
                qemuArguments: [], restoreSeconds: nil,
                guestMemoryBytes: manifest.machine.memoryBytes,
                cowLimitBytes: request.cowLimitBytes,
                overLimitAction: request.overLimitAction,
                lastEnforcement: nil
            )
            record.requestedBy = request.requestedBy
            record.templateDigest = manifest.identity
            do {
                try locked.claimNames(of: record)
                try locked.enterLive(id, committedBytes: committed)
                try store.save(record)
                // A pool member is announced once it is ready (pool.member-ready), not as it warms.
                if state == .starting { locked.record(StoreEvent(.cloneCreated, of: record)) }
            } catch {
                try? locked.removeCloneDirectory(id, record: record, reason: "failed-start")
                throw error
            }
            return record
        }
    }

    /// Starts loading the device state into the waiting QEMU; returns the QMP connection (the
    /// caller closes it) and a function that waits until the state is loaded, the guest still
    /// paused.
    package func restore(_ template: PublishedTemplate, into qemu: QEMUInstance, cloneID: String, timeout: Duration) async throws -> (QMPClient, @Sendable () async throws -> Void) {
        let manifest = template.manifest
        let what = "clone \(cloneID) from template '\(manifest.name)'"
        @Sendable func failed(_ error: any Error) async -> VMTemplateError {
            await qemu.exitError(during: "the restore of \(what)")
                ?? VMTemplateError(.qemuFailed, "restoring \(what) failed: the template may not match this QEMU; create it again.", cause: error)
        }
        @Sendable func timedOut(_ error: VMTemplateError) -> VMTemplateError {
            VMTemplateError(.timeout, "restoring \(what) took longer than \(timeout.shortText): the machine may be overloaded; try again or raise --timeout.", cause: error)
        }
        let qmp: QMPClient
        do {
            // The whole restore is queued with the handshake, before QEMU has even greeted: it
            // runs the moment QEMU's main loop starts. The same capabilities as at save time;
            // `events` announces completion, so no polling.
            // The device state goes to QEMU as an open descriptor (`add-fd`, `file:/dev/fdset/N`):
            // a QEMU that has dropped to its own user need not be able to open the template's
            // file by path (a group-restricted template, a store under a private directory).
            let state = manifest.migration.transport == .file ? open(template.statePath, O_RDONLY | O_CLOEXEC) : -1
            defer { if state >= 0 { close(state) } }
            let load: [QMPCommand] = state >= 0
                ? [.addFD(fdset: Self.stateFDSet), .migrateIncoming(uri: "file:/dev/fdset/\(Self.stateFDSet)")]
                : [.migrateIncoming(uri: manifest.migration.transport.loadURI(from: template.statePath))]
            qmp = try await qemu.connectQMP(
                timeout: timeout,
                pipelining: [.migrateSetCapabilities(["x-ignore-shared": true, "events": true])] + load,
                passing: state >= 0 ? state : nil,
                phase: "the start-up of \(what)")
        } catch let error as QMPError {
            throw await failed(error)
        } catch let error as VMTemplateError where error.code == .timeout {
            throw timedOut(error)
        }
        let running = qmp.greeting.qemuVersion
        guard running == manifest.qemu.version else {
            qmp.close()
            throw VMTemplateError(.unsupported, "QEMU reports version \(running) but template '\(manifest.name)' was made with \(manifest.qemu.version): create the template again with this QEMU.")
        }
        let loaded: @Sendable () async throws -> Void = {
            do {
                // The template was paused when saved, so QEMU keeps the guest paused after loading it.
                _ = try await qmp.waitForMigration(timeout: timeout, startedHere: true)
            } catch let error as VMTemplateError where error.code == .timeout {
                throw timedOut(error)
            } catch {
                throw await failed(error)
            }
        }
        return (qmp, loaded)
    }
}

/// Seconds since the last lap: how ``CloneTimings`` are taken.
struct Lap: Sendable {
    private var last: ContinuousClock.Instant

    init(from start: ContinuousClock.Instant) {
        last = start
    }

    /// Seconds since the last call (or the start), and a new lap from now.
    mutating func next() -> Double {
        let now = ContinuousClock.now
        defer { last = now }
        return last.duration(to: now).seconds
    }
}

extension TemplateStore {
    /// Saves `record` with `timings` and returns it with the save counted in them (`records`,
    /// `total`). The record on disk keeps the figures known when it was written (its own write
    /// not in them): writing it twice to hold them all would cost the clone a second write.
    /// Writes the record of a clone that now runs, and says so in the journal (`clone.running`).
    func saveTimed(_ record: inout CloneRecord, timings: CloneTimings, lap: inout Lap, started: ContinuousClock.Instant) async throws {
        var timings = timings
        timings.total = started.duration(to: .now).seconds
        record.timings = timings
        let running = record
        try await withLock { locked in
            try save(running)
            locked.record(StoreEvent(.cloneRunning, of: running))
        }
        timings.records = lap.next()
        timings.total = started.duration(to: .now).seconds
        record.timings = timings
    }
}
