import CLinuxHost
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The runtime API of `vmtemplate serve`: HTTP/1.1 + JSON on a Unix socket (docs/api.md,
/// docs/api.openapi.json).
///
/// The socket is the store owner's (mode 0600, or 0660 with a group); on top of that, every
/// request's caller is read from the socket's peer credentials (SO_PEERCRED), logged, and must
/// be root, the store's owner, or in the socket's group.
package struct APIServer: Sendable {
    package let engine: CloneEngine
    package let socketPath: String
    /// Members of this group may use the API too (the socket is made 0660 for it).
    package let socketGroup: gid_t?
    package let metrics: APIMetrics
    /// Templates being made through the API (``TemplateCreations``).
    let creations = TemplateCreations()
    /// What callers deposited on the descriptor socket (``DescriptorSocket``).
    package let deposits: DescriptorDeposits

    package var store: TemplateStore { engine.store }
    var callers: CallerPolicy { CallerPolicy(ownerUID: store.ownerUID, group: socketGroup) }
    /// Where callers deposit descriptors: beside the API's socket.
    package var descriptorSocketPath: String { ServerFiles.descriptorSocketPath(beside: socketPath) }

    package init(engine: CloneEngine, socketPath: String, socketGroup: gid_t?, metrics: APIMetrics = APIMetrics(), deposits: DescriptorDeposits = DescriptorDeposits()) {
        self.engine = engine
        self.socketPath = socketPath
        self.socketGroup = socketGroup
        self.metrics = metrics
        self.deposits = deposits
    }

    /// Every route, as `METHOD PATH` with `{name}` parameters: what the OpenAPI document must
    /// list (a test compares them).
    package static let routes = [
        "POST /v1/clones", "GET /v1/clones", "GET /v1/clones/{id}", "DELETE /v1/clones/{id}",
        "POST /v1/clones/{id}/pause", "POST /v1/clones/{id}/resume",
        "POST /v1/clones/{id}/exec", "POST /v1/templates/{name}/verify", "POST /v1/gc",
        "GET /v1/templates", "GET /v1/pools", "PUT /v1/pools/{template}", "GET /metrics",
        "GET /v1/version", "GET /v1/health", "GET /v1/events",
        "GET /v1/clones/{id}/devices", "POST /v1/clones/{id}/devices", "DELETE /v1/clones/{id}/devices/{device}",
        "GET /v1/templates/{name}", "POST /v1/templates", "DELETE /v1/templates/{name}",
        "GET /v1/settings", "PUT /v1/settings", "POST /v1/templates/pull",
    ]

    /// The methods ``routes`` has for `path` (`{name}` matches one segment), sorted.
    static func methods(forPath path: String) -> [String] {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false)
        return routes.compactMap { route -> String? in
            let parts = route.split(separator: " ", maxSplits: 1)
            guard parts.count == 2 else { return nil }
            let pattern = parts[1].split(separator: "/", omittingEmptySubsequences: false)
            guard pattern.count == segments.count else { return nil }
            let matches = zip(pattern, segments).allSatisfy { want, have in
                want.hasPrefix("{") ? !have.isEmpty : want == have
            }
            return matches ? String(parts[0]) : nil
        }.sorted()
    }

    /// Clone `reference` (an exact ID or name) if the caller may change it: a group member only the
    /// clones it asked for; one of a template it may not read is not found.
    static func changeableClone(_ reference: String, by context: APIContext, in store: TemplateStore, doing action: String) throws -> CloneRecord {
        let record = try store.findCloneExactly(reference)
        guard context.readableTemplates(in: store)(record.template) else { throw TemplateStore.noCloneExactly(reference) }
        guard context.callerIsOwner || (record.requestedBy != nil && record.requestedBy == context.callerUID) else {
            throw VMTemplateError(.permissionDenied, "clone \(record.id) was not made by uid \(context.callerUID.map(String.init) ?? "?"): only its requester, the store's owner or root may \(action) it.")
        }
        return record
    }

    /// Refuses NICs and disks that the server would open with the owner's rights (a path, a tap
    /// by name, a namespace, a user-mode network's host ports) to a caller that is not the owner
    /// or root: a member of the socket's group hands over descriptors it opened itself (`fd`).
    static func requireOwnDevices(nics: [DeviceObject], disks: [DeviceObject], context: APIContext) throws {
        guard !context.callerIsOwner else { return }
        if let field = [("nics", nics), ("disks", disks)].first(where: { !$0.1.allSatisfy(\.isGivenDescriptor) })?.0 {
            throw VMTemplateError(.permissionDenied, "only the store's owner or root may give \(field) by path, tap name or user-mode network: those name files, namespaces and ports the server opens with the owner's rights. Deposit a descriptor you opened yourself and give its token as \"fd\" (docs/api.md, \"Descriptors\").")
        }
    }

    /// Refuses a template that is not published because it is being made through the API, or its
    /// making failed: it is known, so not 404, but in no state to be used (409).
    static func refuseUnpublished(_ name: String, in store: TemplateStore, creations: TemplateCreations) throws {
        guard let entity = try? EntityName(name), !store.templateExists(entity), let creation = creations.status(of: name) else { return }
        if let reason = creation.reason {
            throw VMTemplateError(.invalidState, "template '\(name)' could not be made (\(reason)): remove it (DELETE /v1/templates/\(name)) and create it again.")
        }
        throw VMTemplateError(.invalidState, "template '\(name)' is still being made: wait for template.added in GET /v1/events?since=\(creation.since).")
    }

    /// A template as the API shows it, with the live clones of it among `records`.
    static func view(of template: PublishedTemplate, records: [CloneRecord], in store: TemplateStore) -> TemplateView {
        TemplateView(template, clones: records.filter { $0.template == template.manifest.name && $0.isLive }.count, missingFiles: store.missingFiles(of: template))
    }

    /// The default socket: inside the store, next to its lock.
    package static func defaultSocketPath(store: TemplateStore) -> String { "\(store.root)/serve.sock" }

    /// Binds the socket and answers until cancelled. A stale socket file (no server behind it) is
    /// replaced; a live one means another server runs for this store, which is refused.
    /// `onListening` runs once the socket is published and accepts: only then may a start be
    /// announced.
    package func run(logger: Logger = Logger(label: "vmtemplate.serve") { _ in ServeLogHandler(format: .text) }, onListening: @escaping @Sendable () -> Void = {}) async throws {
        try checkSocketPath()
        // What a killed server left beside the socket (identity-checked: a running one keeps it).
        _ = ServerFiles.removeStale(beside: socketPath)
        // Every clone this server starts is its child: reaped as it exits, not kept as a zombie.
        ChildReaper.enable()
        // Bound inside a directory only this process's user may enter, then renamed into place
        // once its mode is set: there is no moment in which others could connect, whatever the
        // umask (a connection made then would stay valid after a chmod).
        let privateDirectory = ServerFiles.privateDirectory(beside: socketPath)
        try? FileSystem.removeTree(path: privateDirectory)
        guard mkdir(privateDirectory, 0o700) == 0 else {
            throw VMTemplateError(.ioError, "cannot create '\(privateDirectory)': \(errnoText()).", cause: SystemCallError("mkdir"))
        }
        defer { try? FileSystem.removeTree(path: privateDirectory) }
        let boundPath = "\(privateDirectory)/serve.sock"
        let descriptorSocket = try DescriptorSocket(boundAt: "\(privateDirectory)/fds.sock")
        let router = Router(context: APIContext.self)
        router.add(middleware: CallerCheck(callers: callers, metrics: metrics))
        addRoutes(to: router)
        addDeviceRoutes(to: router)
        addTemplateRoutes(to: router)
        addSettingsRoutes(to: router)
        let publish: @Sendable (any Channel) async -> Void = { _ in
            do {
                // The descriptor socket first: a caller that finds the API finds it too.
                try self.publishSocket(from: descriptorSocket.boundPath, to: self.descriptorSocketPath)
                try self.publishSocket(from: boundPath, to: self.socketPath)
                onListening()
            } catch {
                // A socket that cannot be secured must not be served: stop at once.
                FileHandle.standardError.write(Data("vmtemplate: error: \(error)\n".utf8))
                exit(1)
            }
        }
        let app = Application(
            router: router,
            // A client that stops talking loses its connection: idle ones cannot pile up until
            // root runs out of descriptors.
            server: .http1(configuration: .init(idleTimeout: .seconds(30))),
            configuration: .init(address: .unixDomainSocket(path: boundPath), serverName: "vmtemplate"),
            onServerRunning: publish,
            logger: logger
        )
        defer {
            unlink(socketPath)
            unlink(descriptorSocketPath)
        }
        // Its own thread: it blocks in poll(2). It ends with the API.
        let deposits = self.deposits
        let callers = self.callers
        let depositLog = logger
        let depositThread = Thread { descriptorSocket.serve(deposits: deposits, callers: callers, log: { depositLog.info("\($0)") }) }
        depositThread.stackSize = 1 << 20
        depositThread.start()
        defer { descriptorSocket.stop() }
        try await app.runService(gracefulShutdownSignals: [.sigterm, .sigint])
    }

    /// Refuses a socket path in a directory others may write (they could swap the socket for a
    /// link between its creation and its chmod), a path that is something else than a socket,
    /// and one another server answers on; removes a stale socket.
    private func checkSocketPath() throws {
        try FileSystem.requireTrustedDirectory(FileSystem.split(socketPath).directory, for: "--socket")
        var info = stat()
        guard lstat(socketPath, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else {
            throw VMTemplateError(.exists, "'\(TerminalText.escape(socketPath))' exists and is not a socket: remove it or pass another --socket.")
        }
        if (try? UnixHTTPClient(socketPath: socketPath).request("GET", "/v1/pools", timeout: .seconds(1))) != nil {
            throw VMTemplateError(.busy, "a server already answers on '\(TerminalText.escape(socketPath))': run one 'vmtemplate serve' per store.")
        }
        unlink(socketPath)
        // A killed server's descriptor socket, when it is one (never another kind of file).
        if lstat(descriptorSocketPath, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK { unlink(descriptorSocketPath) }
    }

    /// Sets the bound socket's mode and group, checks it is still the socket (never a link), and
    /// renames it to where clients look for it.
    private func publishSocket(from boundPath: String, to socketPath: String) throws {
        let fd = open(boundPath, clinuxhost_o_path() | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw VMTemplateError(.ioError, "cannot open the bound socket: \(errnoText()).") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK, info.st_uid == geteuid() else {
            throw VMTemplateError(.permissionDenied, "the bound socket '\(boundPath)' is not this process's socket.")
        }
        guard fchmodat(AT_FDCWD, "/proc/self/fd/\(fd)", socketGroup == nil ? 0o600 : 0o660, 0) == 0 else {
            throw VMTemplateError(.ioError, "cannot set the socket's mode: \(errnoText()).", cause: SystemCallError("chmod"))
        }
        if let socketGroup, fchownat(AT_FDCWD, "/proc/self/fd/\(fd)", uid_t.max, socketGroup, 0) != 0 {
            throw VMTemplateError(.ioError, "cannot give the socket to group \(socketGroup): \(errnoText()).", cause: SystemCallError("chown"))
        }
        guard rename(boundPath, socketPath) == 0 else {
            throw VMTemplateError(.ioError, "cannot move the socket to '\(TerminalText.escape(socketPath))': \(errnoText()).", cause: SystemCallError("rename"))
        }
    }

    private func addRoutes(to router: Router<APIContext>) {
        let engine = self.engine
        let store = self.store
        let lifecycle = CloneLifecycle(store: store)
        let pool = engine.pool
        let metrics = self.metrics
        // Followers poll the journal ten times a second; a read of it decodes up to 8 MiB.
        let followers = EventReaders(limit: 64)
        let readers = EventReaders(limit: 8)
        let creations = self.creations
        let deposits = self.deposits
        router.post("/v1/clones") { request, context -> Response in
            let options = try await Self.decode(CloneOptions.self, from: request)
            // Devices name files and namespaces that the server opens with the owner's rights, a
            // writable template and a bigger translation cache are the host's to give: only the
            // owner (or root) may ask for them, not every member of the socket's group.
            if !context.callerIsOwner {
                let ownersOnly = [("allow_writable_template", options.allowWritableTemplate == true), ("tcg_tb_size", options.tcgTranslationCacheMiB != nil)]
                if let field = ownersOnly.first(where: \.1)?.0 {
                    throw VMTemplateError(.permissionDenied, "only the store's owner or root may set '\(field)' through the API: it spends what is the host's to give.")
                }
            }
            try Self.requireOwnDevices(nics: options.nics ?? [], disks: options.disks ?? [], context: context)
            // What the owner is making is the owner's to know of.
            if context.callerIsOwner { try Self.refuseUnpublished(options.template, in: store, creations: creations) }
            return try await deposits.withClaims(uid: context.callerUID) { descriptors in
                var cloneRequest = try options.request(descriptors: descriptors)
                // The server clones with the owner's rights: only what the caller may read itself.
                try context.requireReadable(try store.template(named: cloneRequest.template))
                cloneRequest.requestedBy = context.callerUID
                // This process outlives the clone's start: a thread of it waits for the guest.
                cloneRequest.guestRepliesInChild = false
                let started = ContinuousClock.now
                let (record, _, created) = try await engine.clone(cloneRequest)
                var view = lifecycle.view(of: record)
                view.created = created
                // A retry gets the clone it made, 200 instead of 201: it is not counted again.
                guard created else { return try Self.json(view, status: .ok) }
                metrics.recordClone(fromPool: record.fromPool == true, seconds: started.duration(to: .now).seconds)
                // pools.json is read only for a fresh clone: never on the hand-out path.
                let fromPool = record.fromPool == true
                metrics.recordCreate(template: record.template, fromPool: fromPool,
                                     hasPool: !fromPool && cloneRequest.usePool && (store.pools.sizes()[record.template] ?? 0) > 0)
                return try Self.json(view, status: .created)
            }
        }
        router.get("/v1/clones") { _, context -> Response in
            // Live, as `list` shows them: a clone whose QEMU was killed is `exited`, not `running`.
            // Only clones of templates the caller may read: a group's template is not the others'
            // to learn of, by its clones either.
            let readable = context.readableTemplates(in: store)
            let records = store.clones().records.filter { $0.state != .pooled && $0.state != .warming && readable($0.template) }
            return try Self.json(await lifecycle.statuses(of: records))
        }
        router.get("/v1/clones/:id") { _, context -> Response in
            let reference = try Self.parameter("id", of: context)
            let record = try store.findCloneExactly(reference)
            guard context.readableTemplates(in: store)(record.template) else { throw TemplateStore.noCloneExactly(reference) }
            return try Self.json(await lifecycle.status(of: record))
        }
        router.delete("/v1/clones/:id") { _, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "remove")
            let how = try await lifecycle.remove(record)
            return try Self.json(["id": record.id, "stopped": how.rawValue])
        }
        // Pause and resume: the requester's, or the owner's (as removal). A clone the scheduler
        // paused over its limit is resumed here as with `vmtemplate resume` (its limit kept).
        router.post("/v1/clones/:id/pause") { _, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "pause")
            return try Self.json(await lifecycle.status(of: try await lifecycle.pause(record)))
        }
        router.post("/v1/clones/:id/resume") { _, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "resume")
            return try Self.json(await lifecycle.status(of: try await lifecycle.resume(record)))
        }
        router.get("/v1/templates") { _, context -> Response in
            // Templates the caller may not read are not its to know of.
            let readable = store.templates().templates.filter(context.mayRead)
            let records = store.clones().records
            return try Self.json(readable.map { Self.view(of: $0, records: records, in: store) })
        }
        // A command through the clone's guest agent, as `vmtemplate exec`: waits behind the
        // clone's own setup on the agent's one channel, within `timeout`.
        router.post("/v1/clones/:id/exec") { request, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "run commands in")
            let body = try await Self.decode(ExecBody.self, from: request)
            let result = try await lifecycle.exec(body.command, in: record, timeout: .seconds(fractional: body.timeout ?? 60))
            return try Self.json(ExecAnswer(exitCode: result.exitCode, signal: result.signal, stdout: result.output, stderr: result.errorOutput))
        }
        router.post("/v1/templates/:name/verify") { _, context -> Response in
            let name = try EntityName(try Self.parameter("name", of: context))
            if context.callerIsOwner { try Self.refuseUnpublished(name.value, in: store, creations: creations) }
            // A template the caller may not read is not its to know of.
            guard let template = try? store.template(named: name), context.mayRead(template) else {
                throw VMTemplateError(.notFound, "no template named '\(name)': see GET /v1/templates.")
            }
            // Every byte hashed again: seconds per GiB, on a thread of its own.
            let verification = try await onOwnThread { try store.verify(name) }
            return try Self.json(verification)
        }
        router.post("/v1/gc") { _, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may collect garbage: it stops QEMUs and removes files.")
            }
            return try Self.json(await GarbageCollector(store: store).collect())
        }
        router.get("/v1/pools") { _, context -> Response in
            let readable = context.readableTemplates(in: store)
            return try Self.json(pool.status().filter { readable($0.template) })
        }
        router.put("/v1/pools/:template") { request, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may size pools: a pool holds the host's memory.")
            }
            let name = try EntityName(try Self.parameter("template", of: context))
            try Self.refuseUnpublished(name.value, in: store, creations: creations)
            let body = try await Self.decode(PoolSizeBody.self, from: request)
            try await pool.setSize(name, body.size)
            let status = pool.status().first { $0.template == name.value } ?? WarmPool.Status(template: name.value, size: 0, ready: 0, filling: 0)
            return try Self.json(status)
        }
        // The store's event journal, one JSON object per line: what is kept after `since`, then
        // (with `follow`) each event as it is written, a blank line every 15 s keeping the
        // connection open. A `since` older than what is kept is 410: the caller lists again.
        router.get("/v1/events") { request, context -> Response in
            let query = request.uri.queryParameters
            let follow = try Self.booleanQuery("follow", query["follow"]) ?? false
            let journal = store.events
            var since: UInt64 = 0
            if let raw = query["since"] {
                guard let value = UInt64(raw), value <= UInt64(Int64.max) else {
                    throw VMTemplateError(.invalidArgument, "since must be an event's seq (a whole number of 0 or more): the last one you read.")
                }
                since = value
            } else if follow {
                since = journal.lastSeq()
            }
            let uid = context.callerUID ?? uid_t.max
            guard let readSlot = readers.take(uid: uid, isOwner: context.callerIsOwner) else {
                throw VMTemplateError(.limitExceeded, "\(readers.limit) reads of the events run already: try again in a moment.")
            }
            let backlog: EventJournal.Reading
            do {
                backlog = try journal.read(after: since)
            } catch let error as VMTemplateError where error.cause is EventJournal.Expired {
                return APIError.response(error, status: .gone)
            }
            _ = readSlot
            let caller = context
            let visible: @Sendable ([StoreEvent]) -> ByteBuffer = { events in
                let readable = caller.readableExistingTemplates(in: store)
                var buffer = ByteBuffer()
                // The owner sees everything; anybody else the events of templates it may read
                // now, never one of a template that is gone, failed or unnamed (a gc's removal).
                for event in events where caller.callerIsOwner || (event.type != .templateRemoved && event.type != .templateFailed && readable(event.template)) {
                    guard let line = try? JSONCoding.line(event) else { continue }
                    buffer.writeString(line + "\n")
                }
                return buffer
            }
            let headers: HTTPFields = [.contentType: "application/x-ndjson"]
            guard follow else {
                return Response(status: .ok, headers: headers, body: .init(byteBuffer: visible(backlog.events)))
            }
            // Each follower polls the journal ten times a second: their number is bounded. The
            // slot goes with the answer, written or not (a caller that hung up before it started).
            guard let slot = followers.take(uid: uid, isOwner: context.callerIsOwner) else {
                throw VMTemplateError(.limitExceeded, "\(followers.limit) clients follow the events already (\(EventReaders.perCaller) at most per user): close one, or read without follow and poll.")
            }
            let first = visible(backlog.events)
            let position = since
            return Response(status: .ok, headers: headers, body: ResponseBody { writer in
                _ = slot
                if first.readableBytes > 0 { try await writer.write(first) }
                var tail = EventJournal.Tail(journal, after: position, continuing: backlog)
                var quiet = ContinuousClock.now
                // A stopping server ends the stream (graceful shutdown would otherwise wait for
                // every follower to hang up).
                while !Task.isCancelled && !Task.isShuttingDownGracefully && !tail.gap {
                    let events = tail.next()
                    let buffer = visible(events)
                    if buffer.readableBytes > 0 {
                        try await writer.write(buffer)
                        quiet = .now
                    } else if quiet.duration(to: .now) > .seconds(15) {
                        // Keeps the connection (and its idle timeout) alive, and finds a reader
                        // that has gone: its write fails.
                        try await writer.write(ByteBuffer(string: "\n"))
                        quiet = .now
                    }
                    try await Task.sleep(for: .milliseconds(100))
                }
                try await writer.finish(nil)
            })
        }
        let descriptorSocketPath = self.descriptorSocketPath
        router.get("/v1/version") { _, _ -> Response in
            try Self.json(["version": VMTemplateVersion.current, "api": VMTemplateVersion.api, "descriptor_socket": descriptorSocketPath])
        }
        router.get("/v1/health") { _, _ -> Response in
            // Answering at all is the health: the store is checked so that a server whose store
            // went away (unmounted, removed) says so instead of failing each request.
            var info = stat()
            guard stat(store.root, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
                throw VMTemplateError(.ioError, "the store '\(store.root)' is gone: restart vmtemplate serve once it is back.")
            }
            return try Self.json(["status": "ok", "store": store.root])
        }
        router.get("/metrics") { _, _ -> Response in
            let text = await metrics.text(store: store)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: .init(byteBuffer: ByteBuffer(string: text)))
        }
    }

    /// A query parameter that is `true` or `false` (nil when absent).
    static func booleanQuery(_ name: String, _ raw: Substring?) throws -> Bool? {
        guard let raw else { return nil }
        switch raw {
        case "true": return true
        case "false": return false
        default: throw VMTemplateError(.invalidArgument, "\(name) must be true or false, not '\(TerminalText.escape(String(raw.prefix(40))))'.")
        }
    }

    /// The largest request body the API reads: a clone request is a few hundred bytes.
    static let maxBodyBytes = 64 * 1024

    /// A path parameter as the caller meant it: percent-decoded (`sb%2Dpct` is `sb-pct`). What it
    /// names is checked by the lookup it goes to.
    static func parameter(_ name: String, of context: APIContext) throws -> String {
        let raw = try context.parameters.require(name)
        return raw.removingPercentEncoding ?? raw
    }

    /// The body decoded by the library's own decoder, so that a bad body is answered with the
    /// same one-phrase reasons as a bad file (``JSONErrorText``), not Hummingbird's.
    static func decode<Body: Decodable>(_ type: Body.Type, from request: Request) async throws -> Body {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: maxBodyBytes)
        } catch {
            throw HTTPError(.contentTooLarge, message: "the request body is larger than \(maxBodyBytes / 1024) KiB: send what docs/api.openapi.json describes (a clone request is a few hundred bytes).")
        }
        do {
            return try JSONCoding.decoder().decode(Body.self, from: Data(buffer.readableBytesView))
        } catch let error as VMTemplateError {
            // The body's own check (an unknown field): already one clear line.
            throw error
        } catch {
            throw VMTemplateError(.invalidArgument, "the request body cannot be read: \(JSONErrorText.describe(error)); send what docs/api.openapi.json describes.")
        }
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let data = try JSONCoding.encode(value)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// How many clients read `GET /v1/events` now: at most ``limit`` in all, ``perCaller`` of one
/// uid other than the owner's, so that one member of the socket's group cannot take them all.
final class EventReaders: Sendable {
    let limit: Int
    static let perCaller = 8
    private let counts = Mutex<[uid_t: Int]>([:])

    init(limit: Int) {
        self.limit = limit
    }

    /// A slot, given back when the slot is released (whether or not its answer was ever written).
    final class Slot: Sendable {
        let readers: EventReaders
        let uid: uid_t

        init(readers: EventReaders, uid: uid_t) {
            self.readers = readers
            self.uid = uid
        }

        deinit { readers.counts.withLock { $0[uid, default: 1] -= 1 } }
    }

    func take(uid: uid_t, isOwner: Bool) -> Slot? {
        let taken = counts.withLock { counts -> Bool in
            guard counts.values.reduce(0, +) < limit, isOwner || counts[uid, default: 0] < Self.perCaller else { return false }
            counts[uid, default: 0] += 1
            return true
        }
        return taken ? Slot(readers: self, uid: uid) : nil
    }
}

/// `POST /v1/clones/{id}/exec`'s body: the command (argv) and how long to wait, in seconds.
struct ExecBody: Decodable, Sendable {
    var command: [String]
    var timeout: Double?

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: ["command", "timeout"], in: "the exec body")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        command = try c.decode([String].self, forKey: .command)
        try GuestCommand.check([command], key: "command")
        guard !command.contains(where: \.isEmpty) else {
            throw VMTemplateError(.invalidArgument, "command holds an empty argument: give the program and each argument as non-empty strings.")
        }
        timeout = try c.decodeIfPresent(Double.self, forKey: .timeout)
        if let timeout, !(timeout > 0 && timeout <= 3600) {
            throw VMTemplateError(.invalidArgument, "timeout \(timeout) is out of range: give 0 < timeout <= 3600 seconds.")
        }
    }

    enum CodingKeys: String, CodingKey {
        case command, timeout
    }
}

/// What a command run through the guest agent did; its output as the guest wrote it (JSON escapes it).
struct ExecAnswer: Encodable, Sendable {
    var exitCode: Int?
    var signal: Int?
    var stdout: String
    var stderr: String

    enum CodingKeys: String, CodingKey {
        case exitCode = "exit_code"
        case signal, stdout, stderr
    }
}

struct PoolSizeBody: Decodable, Sendable {
    var size: Int

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: ["size"], in: "the pool's body")
        size = try decoder.container(keyedBy: CodingKeys.self).decode(Int.self, forKey: .size)
    }

    enum CodingKeys: String, CodingKey {
        case size
    }
}

/// The request context: Hummingbird's, plus the connection, whose peer credentials say who
/// calls.
package struct APIContext: RequestContext {
    package var coreContext: CoreRequestContextStorage
    let channel: any Channel
    /// Set by ``CallerCheck`` from the peer credentials.
    var callerUID: uid_t?
    /// Root or the store's owner, as opposed to a member of the socket's group.
    var callerIsOwner = false
    /// Every group the caller is in (primary and supplementary), when the request was made.
    var callerGroups: Set<gid_t> = []

    /// Whether the caller may read `template` with its own rights.
    func mayRead(_ template: PublishedTemplate) -> Bool {
        guard let callerUID else { return false }
        return template.isReadable(byUID: callerUID, groups: callerGroups)
    }

    /// Whether the caller may read the template named so (the owner and root: every one; a template
    /// that is gone: yes, its clones are still listed). Each template is looked at once per call.
    func readableTemplates(in store: TemplateStore) -> (String) -> Bool {
        if callerIsOwner { return { _ in true } }
        var seen: [String: Bool] = [:]
        return { name in
            if let known = seen[name] { return known }
            let readable = (try? EntityName(name)).flatMap { try? store.template(named: $0) }.map(mayRead) ?? true
            seen[name] = readable
            return readable
        }
    }

    /// Whether the caller may read the template named so as it is now: it must exist (unlike
    /// ``readableTemplates(in:)``, which lists a gone template's clones): for the event history,
    /// whose templates may long be gone.
    func readableExistingTemplates(in store: TemplateStore) -> (String?) -> Bool {
        if callerIsOwner { return { _ in true } }
        var seen: [String: Bool] = [:]
        return { name in
            guard let name, !name.isEmpty else { return false }
            if let known = seen[name] { return known }
            let readable = (try? EntityName(name)).flatMap { try? store.template(named: $0) }.map(mayRead) ?? false
            seen[name] = readable
            return readable
        }
    }

    /// Refuses a template the caller may not read.
    func requireReadable(_ template: PublishedTemplate) throws {
        guard mayRead(template) else {
            throw VMTemplateError(.permissionDenied, "template '\(template.name)' may be read only by its group, which uid \(callerUID.map(String.init) ?? "?") is not in: ask the store's owner to add you to it.")
        }
    }

    package init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Who may use the server's sockets (the API's and the descriptor socket): root, the store's
/// owner, and the members of the socket's group.
package struct CallerPolicy: Sendable {
    let ownerUID: uid_t
    let group: gid_t?

    /// Whether the caller is root or the owner (true), a member of the group (false), or refused.
    func admit(uid: uid_t, groups: Set<gid_t>) -> Result<Bool, VMTemplateError> {
        if uid == 0 || uid == ownerUID { return .success(true) }
        if let group, groups.contains(group) { return .success(false) }
        return .failure(VMTemplateError(.permissionDenied, "uid \(uid) may not use this server: it answers root, the store's owner (uid \(ownerUID))\(group.map { " and group \($0)" } ?? "")."))
    }
}

/// Reads the caller's uid and gid from the socket (SO_PEERCRED), logs the request with them, and
/// refuses callers who are not root, the store's owner or in the socket's group. Library errors
/// become `{"error": {"code", "message"}}` with their HTTP status.
struct CallerCheck: RouterMiddleware {
    typealias Context = APIContext
    let callers: CallerPolicy
    let metrics: APIMetrics

    /// The request ID a caller may send (and gets back): a short token, else the server's own.
    static let requestIDField = HTTPField.Name("X-Request-Id")

    func handle(_ request: Request, context: APIContext, next: (Request, APIContext) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        var context = context
        if let name = Self.requestIDField, let given = request.headers[name], given.utf8.count <= 64,
           given.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }), !given.isEmpty {
            context.logger[metadataKey: ServeLogHandler.requestIDKey] = .string(given)
        }
        // Paths are the caller's text: bounded and escaped before they reach a log.
        let path = TerminalText.escape(String(request.uri.path.prefix(256)))
        var response: Response
        var caller: Credentials?
        do {
            let credentials = try await Self.peerCredentials(of: context.channel)
            caller = credentials
            let callerGroups = await Self.supplementaryGroups(of: context.channel, pid: credentials.pid).union([credentials.gid])
            let isOwner: Bool
            switch callers.admit(uid: credentials.uid, groups: callerGroups) {
            case .success(let owner):
                isOwner = owner
            case .failure(let refusal):
                context.logger.info("refused \(request.method) \(path) from uid \(credentials.uid) pid \(credentials.pid)")
                throw refusal
            }
            context.callerUID = credentials.uid
            context.callerGroups = callerGroups
            context.callerIsOwner = isOwner
            if let refusal = Self.refusal(of: request) {
                response = refusal
            } else {
                response = try await next(request, context)
            }
        } catch {
            let (failure, status) = Self.failure(error)
            metrics.recordError(failure.code)
            response = APIError.response(failure, status: status)
        }
        metrics.recordRequest(status: response.status.code)
        // One access line per request, when its answer starts (a followed event stream goes on).
        let milliseconds = started.duration(to: .now).seconds * 1000
        context.logger.info("\(request.method) \(path) from uid \(caller.map { String($0.uid) } ?? "?") pid \(caller.map { String($0.pid) } ?? "?")", metadata: [
            "status": .stringConvertible(response.status.code),
            "duration_ms": .string(String(format: "%.1f", milliseconds)),
        ])
        if let name = Self.requestIDField, let id = context.logger[metadataKey: ServeLogHandler.requestIDKey] {
            response.headers[name] = "\(id)"
        }
        return response
    }

    /// A request no route takes, answered as HTTP says: a method the path does not have is `405`
    /// with `Allow`, a body that says it is not JSON is `415`.
    static func refusal(of request: Request) -> Response? {
        let path = request.uri.path
        let allowed = APIServer.methods(forPath: path)
        if !allowed.isEmpty, !allowed.contains(request.method.rawValue) {
            var response = APIError.response(VMTemplateError(.invalidArgument, "\(request.method.rawValue) is not an operation on \(TerminalText.escape(String(path.prefix(256)))): it takes \(allowed.joined(separator: ", ")) (docs/api.openapi.json)."), status: .methodNotAllowed)
            response.headers[.allow] = allowed.joined(separator: ", ")
            return response
        }
        if request.method == .post || request.method == .put, let type = request.headers[.contentType],
           !type.lowercased().hasPrefix("application/json") {
            return APIError.response(VMTemplateError(.invalidArgument, "the body is '\(TerminalText.escape(String(type.prefix(64))))': send application/json (docs/api.openapi.json)."), status: .unsupportedMediaType)
        }
        return nil
    }

    /// Any error as the library error it is answered with, and Hummingbird's own status where it
    /// has one.
    static func failure(_ error: any Error) -> (VMTemplateError, HTTPResponse.Status?) {
        switch error {
        case let error as VMTemplateError:
            return (error, nil)
        case let error as HTTPError:
            // Hummingbird's own: a body that does not decode, an unknown route.
            return (VMTemplateError(error.status.code == 404 ? .notFound : .invalidArgument, error.body ?? "\(error.status.reasonPhrase): check the request against docs/api.openapi.json."), error.status)
        case let error as DecodingError:
            return (VMTemplateError(.invalidArgument, "the request body does not match the API: \(JSONErrorText.describe(error)). See docs/api.openapi.json."), nil)
        default:
            return (VMTemplateError(.internalError, "\(VMTemplateError.oneLine(error))"), nil)
        }
    }

    struct Credentials {
        var pid: Int32
        var uid: uid_t
        var gid: gid_t
    }

    static func peerCredentials(of channel: any Channel) async throws -> Credentials {
        guard let provider = channel as? any SocketOptionProvider else {
            throw VMTemplateError(.permissionDenied, "the caller's credentials cannot be read from this connection.")
        }
        let credentials: clinuxhost_ucred = try await provider.unsafeGetSocketOption(level: .init(rawValue: SOL_SOCKET), name: .init(rawValue: SO_PEERCRED)).get()
        return Credentials(pid: credentials.pid, uid: credentials.uid, gid: credentials.gid)
    }

    /// `SO_PEERPIDFD` (Linux >= 6.5): a pidfd of the process that connected, taken at connect.
    static let peerPIDFDOption: Int32 = 77

    /// The supplementary groups of the process that connected, or none when that cannot be known
    /// for sure. Its PID is from connect time, and that process may have exited since and its PID
    /// gone to another user's process: so the groups are read from /proc only through the pidfd
    /// the kernel kept for the connection, and believed only if that process is still alive after
    /// the read (a live process's PID is never reused). A kernel without `SO_PEERPIDFD`, or a
    /// caller that has exited, counts with its primary group alone.
    static func supplementaryGroups(of channel: any Channel, pid: Int32) async -> Set<gid_t> {
        guard let provider = channel as? any SocketOptionProvider,
              let pidfd: Int32 = try? await provider.unsafeGetSocketOption(level: .init(rawValue: SOL_SOCKET), name: .init(rawValue: peerPIDFDOption)).get(),
              pidfd >= 0 else { return [] }
        defer { close(pidfd) }
        return groups(of: pid, through: pidfd)
    }

    /// The groups of `pid` read from /proc, believed only if `pidfd` (taken when it connected)
    /// says that process is still alive after the read.
    static func groups(of pid: Int32, through pidfd: Int32) -> Set<gid_t> {
        let groups = groups(of: pid)
        return clinuxhost_pidfd_send_signal(pidfd, 0) == 0 ? groups : []
    }

    /// The supplementary groups of process `pid` (the caller), from /proc: no NSS lookups (which
    /// are neither thread-safe nor quick) in the server. Empty when it cannot be read.
    static func groups(of pid: Int32) -> Set<gid_t> {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return [] }
        for line in status.split(separator: "\n") where line.hasPrefix("Groups:") {
            return Set(line.dropFirst("Groups:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { gid_t($0) })
        }
        return []
    }
}

/// ``ErrorBody``, with the status that goes with the code.
enum APIError {
    static func status(for code: VMTemplateError.Code) -> HTTPResponse.Status {
        switch code {
        case .invalidArgument: .badRequest
        case .notFound: .notFound
        case .exists, .busy, .invalidState: .conflict
        case .permissionDenied: .forbidden
        case .limitExceeded: .tooManyRequests
        case .timeout: .gatewayTimeout
        case .unsupported: .notImplemented
        case .integrityFailure, .qemuFailed, .ioError, .internalError: .internalServerError
        }
    }

    static func response(_ error: VMTemplateError, status: HTTPResponse.Status? = nil) -> Response {
        // The message alone: one sentence that says what to do (a cause is for the server's log).
        let body = ErrorBody(code: error.code, message: error.message)
        let data = (try? JSONCoding.encode(body)) ?? Data(#"{"error":{"code":"internalError","message":"encoding failed"}}"#.utf8)
        let status = status ?? Self.status(for: error.code)
        var headers: HTTPFields = [.contentType: "application/json"]
        // A limit that may clear: when to ask again (the store's limits are checked per request).
        if status == .tooManyRequests || status == .serviceUnavailable { headers[.retryAfter] = "1" }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}
