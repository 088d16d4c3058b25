import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// The guest agent client against a stub guest on a socket pair: its framing, and what a hostile
/// guest can make it do (protocol unit tests; the real agent is in the Debian suite).
@Suite("the guest agent client")
struct GuestAgentTests {
    /// A connection and the stub guest's end of it.
    func pair() throws -> (GuestAgentConnection, Int32) {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        return (GuestAgentConnection(fd: fds[0], path: "stub"), fds[1])
    }

    func send(_ text: [UInt8], to fd: Int32) {
        _ = text.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads what the client sent until its sync request, and returns the sync's ID.
    func syncID(from fd: Int32) throws -> Int {
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while !received.contains(0x0a) {
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            try #require(count > 0)
            received += chunk[..<count]
        }
        #expect(received.first == 0xff, "a sync starts with 0xFF, which resets the agent's parser")
        let text = String(decoding: received.dropFirst().prefix { $0 != 0x0a }, as: UTF8.self)
        let request = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(request["execute"] as? String == "guest-sync-delimited")
        return try #require((request["arguments"] as? [String: Any])?["id"] as? Int)
    }

    @Test("a sync skips an earlier client's replies and garbage, and the next reply is this client's")
    func syncSkipsStaleReplies() throws {
        let (agent, guest) = try pair()
        defer { agent.close(); close(guest) }
        let thread = Thread {
            guard let id = try? syncID(from: guest) else { return }
            // Someone else's late reply and some noise, then ours, then the answer to a command.
            send(Array(#"{"return": {"pid": 99}}"#.utf8) + [0x0a, 0x00, 0x41] + [0xff] + Array(#"{"return": 12345}"#.utf8) + [0x0a], to: guest)
            send([0xff] + Array(#"{"return": \#(id)}"#.utf8) + [0x0a] + Array(#"{"return": {}}"#.utf8) + [0x0a], to: guest)
        }
        thread.start()
        let deadline = ContinuousClock.now + .seconds(5)
        try agent.synchronize(until: deadline)
        let reply = try agent.execute("guest-ping", until: deadline)
        #expect((reply as? [String: Any])?.isEmpty == true)
    }

    @Test("an error reply is an error, in words, escaped")
    func errorReply() throws {
        let (agent, guest) = try pair()
        defer { agent.close(); close(guest) }
        send(Array(#"{"error": {"class": "GenericError", "desc": "no \u001b[31m way"}}"#.utf8) + [0x0a], to: guest)
        #expect {
            try agent.execute("guest-exec", until: .now + .seconds(2))
        } throws: { error in
            let message = (error as? VMTemplateError)?.message ?? ""
            return message.contains("refused guest-exec") && !message.contains("\u{1b}")
        }
    }

    @Test("a guest that never reads its port cannot hold a send past its deadline")
    func sendHasADeadline() throws {
        let (agent, guest) = try pair()
        defer { agent.close(); close(guest) }
        var size: Int32 = 4096
        setsockopt(agent.descriptor, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let started = ContinuousClock.now
        #expect(throws: VMTemplateError.self) {
            // Arguments far larger than the socket's buffers, which the stub never reads.
            try agent.execute("guest-exec", arguments: ["path": "true", "arg": Array(repeating: String(repeating: "x", count: 4000), count: 512)], until: .now + .milliseconds(300))
        }
        #expect(started.duration(to: .now) < .seconds(10), "it gave up at its deadline")
    }

    @Test("a line longer than the limit is refused, not buffered without end")
    func longLineRefused() throws {
        let (agent, guest) = try pair()
        defer { agent.close(); close(guest) }
        let thread = Thread {
            let chunk = [UInt8](repeating: 0x41, count: 64 * 1024)
            for _ in 0..<(GuestAgentConnection.maxReplyBytes / chunk.count + 2) { send(chunk, to: guest) }
        }
        thread.start()
        #expect {
            try agent.execute("guest-ping", until: .now + .seconds(20))
        } throws: { error in
            (error as? VMTemplateError)?.message.contains("a line of more than") == true
        }
    }

    @Test("a command's placeholders are filled in; the plan keeps them as written")
    func placeholders() throws {
        let setup = GuestAgentSetup(cloneID: "0123456789ab", hostname: "web-1", commands: [["renew", "{hostname}", "{random}", "{id}"]])
        #expect(setup.commands == [["renew", "{hostname}", "{random}", "{id}"]], "{random} must never be in a plan a helper reads")
        #expect(GuestCommand.expand(setup.commands[0], hostname: "web-1", id: "0123456789ab", random: "ff") == ["renew", "web-1", "ff", "0123456789ab"])
        #expect(throws: VMTemplateError.self) { try GuestCommand.check([[String](repeating: "x", count: 65)], key: "guest_commands") }
        #expect(throws: VMTemplateError.self) { try GuestCommand.check([[String(repeating: "y", count: 4000)]] + Array(repeating: [String(repeating: "z", count: 4000)], count: 15) + [["a"]], key: "guest_commands") }
    }
}
